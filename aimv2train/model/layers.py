"""Transformer building blocks shared by the encoder and the decoder: RMSNorm, SwiGLU, attention
(fused qkv; torch SDPA, or FlexAttention for the encoder's prefix mask) and the pre-norm block.
Everything is bias-free, as in Apple's release."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

_compiled_flex = None


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """flex_attention on a fused kernel: eager flex_attention materialises the whole score matrix, so
    outside a compiled graph it runs through its own torch.compile (compiled once per shape family);
    inside one (torch.compile of the trainer's step) dynamo fuses it anyway. Default dynamic: after the
    first new grid it compiles one kernel for all sequence lengths (native resolution has 33 grids)."""
    global _compiled_flex
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex(q, k, v, block_mask=block_mask)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 even under bf16 autocast (what transformers' Aimv2RMSNorm does), scale after
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """fc2(silu(fc1 x) * fc3 x): fc1 is the gate, fc3 the up projection, fc2 the down projection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Attention(nn.Module):
    """Multi-head self-attention. qkv is one (3D, D) matrix laid out [q; k; v], heads contiguous
    inside each (ml-aim's layout), so q = qkv.weight[:D] is transformers' q_proj.weight."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if isinstance(attn_mask, BlockMask):  # the encoder's prefix mask, block-sparse (masks.prefix_block_mask)
            x = flex(q, k, v, attn_mask)
        else:
            # boolean mask: True = may attend. SDPA picks flash (no mask, or is_causal: the decoder) and
            # memory-efficient (dense mask: the reference prefix path) on GPU.
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then x + mlp(norm2 x)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = RMSNorm(dim, eps)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None,
                is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask, is_causal)
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None,
               is_causal: bool = False, checkpoint: bool = False) -> torch.Tensor:
    """Apply blocks in order; with `checkpoint`, recompute each block's activations in backward."""
    for blk in blocks:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(blk, x, attn_mask, is_causal, use_reentrant=False)
        else:
            x = blk(x, attn_mask, is_causal)
    return x


def init_weights(module: nn.Module) -> None:
    """xavier-uniform linears and patch projection (MAE / ml-l3m `xavier_uniform`), N(0, 0.02) tables."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))  # as a linear on the patch
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
