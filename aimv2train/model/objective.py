"""The AIMv2 objective (paper §2.1): L = L_text + alpha * L_img.

L_img: MSE between the predicted and the true next patch, the target normalised over its own p*p*3
values (MAE's norm_pix_loss: mean and unbiased variance, eps 1e-6), averaged over the non-prefix
targets of the whole batch. L_text: next-token cross-entropy averaged over the non-pad caption tokens of
the whole batch; the first caption token is predicted from the last image position.
Both are computed in fp32 whatever the autocast dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import target_mask


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE
    return (patches - mean) / (var + eps) ** 0.5


def pixel_loss(pred: torch.Tensor, patches: torch.Tensor, prefix_len: torch.Tensor,
               eps: float = 1e-6) -> torch.Tensor:
    """pred (B, I-1, P): prediction i is for patch i+1; patches (B, I, P); prefix_len (B,)."""
    B, I, _ = patches.shape
    if pred.shape[:2] != (B, I - 1):
        raise ValueError(f"pixel predictions {tuple(pred.shape)} do not match {I} patches per image")
    target = normalize_patches(patches[:, 1:].float(), eps)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, I-1)
    counted = target_mask(prefix_len, I).to(per_patch.dtype)
    return (per_patch * counted).sum() / counted.sum().clamp(min=1)


def pixel_targets(prefix_len: torch.Tensor, num_patches: int) -> torch.Tensor:
    """How many patches pixel_loss averages over (its denominator before the clamp), on prefix_len's device."""
    return target_mask(prefix_len, num_patches).sum()


def text_targets(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """How many tokens text_loss averages over (its denominator before the clamp), on tokens' device."""
    return (tokens != pad_id).sum()


def text_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """logits (B, T, V): position t predicts tokens[:, t]; pad tokens do not count."""
    total = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), ignore_index=pad_id,
                            reduction="sum")
    return total / text_targets(tokens, pad_id).clamp(min=1)
