"""Turning one image file into encoder input, for inference (`aimv2 embed`).

Fixed resolution: shorter side to R (bicubic), centre crop R x R: what transformers' AIMv2 image
processor (CLIPImageProcessor) does. Native resolution: the image keeps its aspect ratio on a patch
grid of at most `max_patches` patches (the loader's area budget A, with h*w <= A); an image smaller than
the budget keeps its own size rounded to whole patches (no upscaling). Pixels are normalised with the
CLIP/AIMv2 mean and std of the Batch contract (aimv2data.batch).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps

from aimv2data.batch import normalize
from aimv2data.paper import PATCH_SIZE


def load_rgb(path) -> Image.Image:
    """Decode an image file with EXIF orientation applied (the manifest's display size), as RGB."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        return im.convert("RGB")


def native_grid(width: int, height: int, max_patches: int, patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """(h, w) patches for a width x height image: its own size rounded to whole patches when that fits
    in `max_patches`, else the largest grid with the image's aspect ratio and h*w <= max_patches."""
    if max_patches < 1:
        raise ValueError(f"max_patches must be >= 1, got {max_patches}")
    own_h, own_w = max(1, round(height / patch_size)), max(1, round(width / patch_size))
    if own_h * own_w <= max_patches:
        return own_h, own_w
    aspect = width / height
    h = max(1, math.floor(math.sqrt(max_patches / aspect)))
    w = min(max(1, math.floor(math.sqrt(max_patches * aspect))), max_patches // h)
    return h, w


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> CLIP-normalised float32 (3, H, W)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return normalize(x[None])[0]


def fixed_resolution(img: Image.Image, resolution: int) -> torch.Tensor:
    w, h = img.size
    # CLIPImageProcessor's shortest_edge resize (transformers' get_resize_output_image_size): the longer
    # side is int(R * long / short), truncated, computed in that order; rounding moves half the images
    short, long = min(w, h), max(w, h)
    new_long = int(resolution * long / short)
    nw, nh = (resolution, new_long) if w <= h else (new_long, resolution)
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return to_tensor(img.crop((left, top, left + resolution, top + resolution)))


def native_resolution(img: Image.Image, max_patches: int, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    gh, gw = native_grid(img.width, img.height, max_patches, patch_size)
    return to_tensor(img.resize((gw * patch_size, gh * patch_size), Image.BICUBIC))
