"""The Batch: the only thing the trainer sees from the data side (docs/contracts.md).

Every image in a batch shares one patch grid (h, w), so a batch is one dense tensor: no packing,
no attention masks, no padding. `patches` is derived from `images` on first access (MAE's
patchify) rather than built by the loader, so worker processes ship each pixel once.

Pixels stay uint8 (0..255) from the decoder to the device: a quarter of float32's bytes through worker
shared memory, the pinned copy and the host-to-device transfer. The model normalises them there
(`normalize`, `normalize_patches`: AIMv2.training_loss), after `Batch.to(device)`, so the patch cut and
the normalisation run on the device. Both decoders fill channels-last memory (`empty_images`: a
(B, H, W, 3) buffer seen as (B, 3, H, W)), the layout a decoder writes pixel by pixel; one layout for
every batch also keeps torch.compile's stride guards from recompiling.
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


def empty_images(b: int, h: int, w: int, device=None) -> torch.Tensor:
    """uint8 zeros (b, 3, h, w) in channels-last memory: the buffer every batch's images live in."""
    return torch.zeros((b, h, w, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)


def _affine(device, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) with x * scale + shift == (x - 255 mean) / (255 std), shaped to broadcast."""
    scale = torch.tensor([1 / (255 * s) for s in STD], device=device).view(shape)
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)], device=device).view(shape)
    return scale, shift


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W), any memory layout -> contiguous float32 (B, 3, H, W), CLIP-normalised, on the
    images' device."""
    scale, shift = _affine(images.device, (1, 3, 1, 1))
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    return x * scale + shift


def normalize_patches(patches: torch.Tensor) -> torch.Tensor:
    """uint8 (B, N, p*p*3) (`patchify`'s layout: channel fastest) -> float32, CLIP-normalised: equal to
    `patchify(normalize(images))`."""
    scale, shift = _affine(patches.device, (3,))
    x = patches.to(torch.float32).unflatten(-1, (-1, 3))
    return (x * scale + shift).flatten(-2)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP-normalised (B, 3, H, W) -> uint8 (B, 3, H, W): the inverse of `normalize`."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8)


@dataclass
class Batch:
    images: torch.Tensor                      # uint8 (B, 3, h*p, w*p), RGB 0..255, channels-last memory
    grid: tuple[int, int]                     # (h, w) patches
    patch_size: int
    captions: list[str]
    keys: list[str]
    sources: list[str]
    tokens: torch.Tensor | None = None        # int64 (B, 77), padded with the tokenizer's pad id
    source_epoch: int = 0                     # the epoch its source stream is in (a stream's epoch: each of its rows once)
    global_step: int = 0                      # the training step it is for (0-based; the loader's segment start + offset)
    area: int = 0                             # sampled area A (patches); h*w <= A
    replaced: list[tuple[str, str]] = field(default_factory=list)  # (key that failed, reason)
    padding: float = 0.0                      # fraction of pixels with no image content (0 by design)
    caption_sets: list[str] = field(default_factory=list)   # per sample: alt, the syn_<name> drawn, or none

    @cached_property
    def patches(self) -> torch.Tensor:
        """uint8 (B, h*w, p*p*3): `images` cut into p x p patches in raster order (cut where `images` are:
        after `to(device)`, on the device)."""
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
                    self.source_epoch, self.global_step, self.area, self.replaced, self.padding, self.caption_sets)
        return out

    def pin_memory(self) -> "Batch":
        # Called by torch's DataLoader when pin_memory=True.
        self.images = self.images.pin_memory()
        if self.tokens is not None:
            self.tokens = self.tokens.pin_memory()
        self.__dict__.pop("patches", None)
        return self
