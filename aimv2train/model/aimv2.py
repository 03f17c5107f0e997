"""AIMv2 for pre-training: encoder (prefix attention) -> multimodal causal decoder -> two bias-free
heads, pixels (p*p*3) and vocabulary.

The decoder sees [image tokens (I) | caption tokens 0..T-2]; position i < I-1 predicts patch i+1, position
I-1 (the last image token) predicts caption token 0, and caption position t predicts token t+1. The
last caption token is never an input, since nothing after it is scored.

The trainer calls

    loss, parts = model.training_loss(batch.images, batch.patches, batch.tokens, pad_id, generator=g)

with a CPU torch.Generator for reproducible prefix lengths; parts holds detached loss_img, loss_text
and the prefix lengths drawn.

The encoder's prefix mask runs on one of two kernels (`set_attention`): "flex", a FlexAttention
BlockMask with each sample's prefix length (a fused kernel that skips the masked-out blocks), or "sdpa",
the dense (B, 1, I, I) boolean mask through SDPA, the reference. "auto" (the default) is flex on CUDA,
sdpa elsewhere: FlexAttention has no backward on CPU. The decoder is causal on SDPA's is_causal=True
(the flash kernel) either way.
"""
from __future__ import annotations

import torch
from torch import nn

from aimv2data.batch import patchify

from .config import ModelConfig
from .mm_decoder import MultimodalDecoder
from .encoder import Encoder
from .layers import init_weights
from .masks import prefix_block_mask, prefix_causal_mask, resolve_attention, sample_prefix_lengths
from .objective import pixel_loss, text_loss


class AIMv2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder = Encoder(enc)
        self.decoder = MultimodalDecoder(dec, enc.dim)
        self.pixel_head = nn.Linear(dec.dim, enc.patch_size ** 2 * enc.in_chans, bias=False)
        self.text_head = nn.Linear(dec.dim, dec.vocab_size, bias=False)
        init_weights(self.pixel_head)
        init_weights(self.text_head)
        self.attention = "auto"

    def set_attention(self, kind: str = "auto") -> None:
        """The encoder's prefix-mask kernel: "flex" (FlexAttention BlockMask), "sdpa" (dense mask, the
        reference) or "auto" (flex on CUDA, sdpa elsewhere). Same numbers either way (tests/test_model_attention.py)."""
        resolve_attention(kind, "cpu")  # validates the name
        self.attention = kind

    def prefix_mask(self, prefix_len: torch.Tensor, num_patches: int):
        """The encoder's training mask on the kernel `self.attention` picks for prefix_len's device."""
        if resolve_attention(self.attention, prefix_len.device) == "flex":
            return prefix_block_mask(prefix_len, num_patches)
        return prefix_causal_mask(prefix_len, num_patches)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (trades ~1/3 more compute for activation memory)."""
        self.encoder.grad_checkpointing = enabled
        self.decoder.grad_checkpointing = enabled

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, 3, H, W); tokens (B, T) or None; prefix_len (B,) or None (no mask).

        Returns pixel predictions (B, I-1, p*p*3) for patches 1..I-1 and text logits (B, T, V) for
        tokens 0..T-1 (None without tokens)."""
        p = self.cfg.encoder.patch_size
        I = (images.shape[2] // p) * (images.shape[3] // p)
        mask = None if prefix_len is None else self.prefix_mask(prefix_len.to(images.device), I)
        z = self.encoder(images, mask)
        h = self.decoder(z, None if tokens is None else tokens[:, :-1])
        pixels = self.pixel_head(h[:, : I - 1])
        logits = None if tokens is None else self.text_head(h[:, I - 1:])
        return pixels, logits

    def training_loss(self, images: torch.Tensor, patches: torch.Tensor | None, tokens: torch.Tensor | None,
                      pad_id: int, generator: torch.Generator | None = None,
                      prefix_len: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_text + alpha * L_img for one batch. `patches` None: cut from `images`. `tokens` None: image
        loss only (loss_text reported as 0). `prefix_len` None: drawn M ~ U{1..I-1} from `generator`."""
        p = self.cfg.encoder.patch_size
        B, C, H, W = images.shape
        I = (H // p) * (W // p)
        if patches is None:
            patches = patchify(images, p)
        if patches.shape != (B, I, p * p * C):
            raise ValueError(f"patches {tuple(patches.shape)} do not match images {tuple(images.shape)}: "
                             f"expected {(B, I, p * p * C)} (Batch.patches, docs/contracts.md)")
        if tokens is not None and tokens.dtype != torch.long:
            raise TypeError(f"tokens must be int64 ids, got {tokens.dtype}")
        if prefix_len is None:
            prefix_len = sample_prefix_lengths(B, I, generator)
        prefix_len = prefix_len.to(images.device)
        pred, logits = self(images, tokens, prefix_len)
        loss_img = pixel_loss(pred, patches, prefix_len, self.cfg.norm_pix_eps)
        loss_text = text_loss(logits, tokens, pad_id) if tokens is not None else loss_img.new_zeros(())
        loss = loss_text + self.cfg.alpha * loss_img
        return loss, {"loss_img": loss_img.detach(), "loss_text": loss_text.detach(), "prefix_len": prefix_len}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
