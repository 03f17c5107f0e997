"""The multimodal decoder (paper §2.2): encoder tokens linearly projected to the decoder width,
caption tokens embedded with learned positions, the sequence [image | text] under causal
self-attention (SDPA's is_causal=True, no mask tensor: the flash kernel on GPU), final RMSNorm. Image tokens
get no extra position here: the encoder gave them one.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import DecoderConfig
from .layers import Block, RMSNorm, init_weights, run_blocks


class MultimodalDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, encoder_dim: int):
        super().__init__()
        self.cfg = cfg
        self.image_proj = nn.Linear(encoder_dim, cfg.dim)  # a plain nn.Linear, as in ml-l3m's AIMv2 config
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.text_pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_hidden, cfg.eps) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.grad_checkpointing = False
        init_weights(self)
        nn.init.trunc_normal_(self.text_pos, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Norm scales and biases (1-D) and the caption position table are not decayed."""
        return {n for n, p in self.named_parameters() if p.ndim < 2} | {"text_pos"}

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """image_tokens (B, I, D_enc), text_tokens (B, T) ids or None -> hidden (B, I + T, dim)."""
        x = self.image_proj(image_tokens)
        if text_tokens is not None:
            T = text_tokens.shape[1]
            if T > self.cfg.max_text_len:
                raise ValueError(f"{T} text tokens exceed the decoder's {self.cfg.max_text_len} positions")
            x = torch.cat([x, self.token_embed(text_tokens) + self.text_pos[:, :T]], dim=1)
        x = run_blocks(self.blocks, x, is_causal=True, checkpoint=self.grad_checkpointing)
        return self.norm(x)
