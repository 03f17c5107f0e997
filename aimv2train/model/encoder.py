"""The AIMv2 vision encoder, as Apple released it: Conv2d patch embedding (with bias) -> RMSNorm ->
+ position embedding -> pre-norm blocks -> final RMSNorm. No class token.

`Encoder(pixels)` returns the final-norm tokens (B, h*w, D), row-major: the same tensor as transformers'
`Aimv2VisionModel(...).last_hidden_state` and ml-aim's `AIMv2VisionEncoder` with no head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from .config import EncoderConfig
from .layers import Block, RMSNorm, init_weights, run_blocks
from .posemb import resize_learned, sincos_2d


class PatchEmbed(nn.Module):
    """A p x p, stride-p Conv2d, then RMSNorm. Under torch.compile the same weights are applied as one
    linear layer over the pixels cut into patches: with dynamic shapes the conv's output strides get
    specialised on the grid width (a recompile for every new grid), the linear form compiles once.
    Eager mode keeps the conv, the exact op of the released models (and faster on CPU)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=p, stride=p)
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            return self.norm(self.proj(pixels).flatten(2).transpose(1, 2))  # (B, h*w, D), row-major
        B, C, H, W = pixels.shape
        p = self.proj.kernel_size[0]
        h, w = H // p, W // p
        x = pixels.reshape(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
        x = F.linear(x, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)
        return self.norm(x)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        if cfg.pos_embed == "learned":
            h, w = cfg.grid
            self.pos_embed = nn.Parameter(torch.zeros(1, h * w, cfg.dim))
        else:
            self.register_parameter("pos_embed", None)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_hidden, cfg.eps) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.grad_checkpointing = False
        init_weights(self)
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters AdamW does not decay (Table A1): norm scales and biases (1-D) and the
        learned position table."""
        return {n for n, p in self.named_parameters() if p.ndim < 2} | \
            ({"pos_embed"} if self.pos_embed is not None else set())

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (each gathered for its own forward): the blocks."""
        return list(self.blocks)

    def position_embedding(self, h: int, w: int, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None:
            return sincos_2d(h, w, self.cfg.dim, device=x.device, dtype=x.dtype)[None]
        return resize_learned(self.pos_embed, self.cfg.grid, (h, w))

    def forward(self, pixels: torch.Tensor, attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """pixels (B, 3, h*p, w*p) -> final-norm tokens (B, h*w, D). `attn_mask`: the prefix mask for
        training, as a (B, 1, N, N) boolean SDPA mask (masks.prefix_causal_mask, the reference) or a
        FlexAttention BlockMask (masks.prefix_block_mask, the fast kernel); None = bidirectional (inference)."""
        _, _, H, W = pixels.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(pixels)
        x = x + self.position_embedding(H // p, W // p, x)
        x = run_blocks(self.blocks, x, attn_mask, checkpoint=self.grad_checkpointing)
        return self.norm(x)
