"""The Batch: the only thing the trainer sees from the data side (docs/contracts.md).

Every image in a batch shares one patch grid (h, w), so a batch is one dense tensor: no packing,
no attention masks, no padding. `patches` is derived from `images` on first access (MAE's
patchify) rather than built by the loader, so worker processes ship each pixel once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from .paper import MEAN, STD  # noqa: F401  (CLIP / AIMv2 normalisation, re-exported for the decoders)


# Why a sample was replaced, as the reason in Batch.replaced starts: the store did not answer its read
# (an outage: nothing known wrong with the shards), or anything else (missing or damaged tar, bytes that
# do not decode: check the shards). metrics.jsonl counts them apart: replaced_unreachable, replaced_damaged.
UNREACHABLE = "unreachable: "
REPLACED_KINDS = ("unreachable", "damaged")


def replaced_kind(reason: str) -> str:
    return "unreachable" if reason.startswith(UNREACHABLE) else "damaged"


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, h*p, w*p) -> (B, h*w, p*p*3): patches in raster order, each flattened (row, col, ch)."""
    b, c, hh, ww = images.shape
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
    h, w = hh // p, ww // p
    x = images.reshape(b, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, h * w, p * p * c)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """Inverse of `patchify`: (B, h*w, p*p*3) -> (B, 3, h*p, w*p)."""
    h, w = grid
    b = patches.shape[0]
    x = patches.reshape(b, h, w, p, p, 3)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, 3, h * p, w * p)


def normalize_(images: torch.Tensor) -> torch.Tensor:
    """uint8-range float (B, 3, H, W) -> CLIP-normalised, in place."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) * 255.0
    return images.sub_(mean).div_(std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) -> uint8 (B, 3, H, W), for looking at a batch."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


@dataclass
class Batch:
    images: torch.Tensor                      # float32 (B, 3, h*p, w*p), normalised with MEAN/STD
    grid: tuple[int, int]                     # (h, w) patches
    patch_size: int
    captions: list[str]
    keys: list[str]
    sources: list[str]
    tokens: torch.Tensor | None = None        # int64 (B, 77), padded with the tokenizer's pad id
    epoch: int = 0
    step: int = 0                             # step within the epoch (what state_dict resumes from)
    area: int = 0                             # sampled area A (patches); h*w <= A
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (key that failed, reason)
    padding: float = 0.0                      # fraction of pixels with no image content (0 by design)

    @cached_property
    def patches(self) -> torch.Tensor:
        """float32 (B, h*w, p*p*3): `images` cut into p x p patches in raster order."""
        return patchify(self.images, self.patch_size)

    def __len__(self) -> int:
        return self.images.shape[0]

    def replaced_counts(self) -> dict[str, int]:
        """Replaced samples of this batch by kind (REPLACED_KINDS)."""
        kinds = [replaced_kind(reason) for _, reason in self.replaced]
        return {k: kinds.count(k) for k in REPLACED_KINDS}

    def to(self, device, non_blocking: bool = False) -> "Batch":
        out = Batch(self.images.to(device, non_blocking=non_blocking), self.grid, self.patch_size,
                    self.captions, self.keys, self.sources,
                    None if self.tokens is None else self.tokens.to(device, non_blocking=non_blocking),
                    self.epoch, self.step, self.area, self.replaced, self.padding)
        return out

    def pin_memory(self) -> "Batch":
        # Called by torch's DataLoader when pin_memory=True.
        self.images = self.images.pin_memory()
        if self.tokens is not None:
            self.tokens = self.tokens.pin_memory()
        self.__dict__.pop("patches", None)
        return self
