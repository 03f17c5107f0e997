"""Where each output pixel comes from: one source box per sample, resized to the output size.

Both kinds of batch reduce to the same thing, so both decoders implement one operation:
  native resolution: resize to cover (w*p, h*p) keeping aspect, centre-crop the overhang
                     == the centred source box of the output's aspect, resized to the output;
  fixed resolution:  RandomResizedCrop == a random source box, resized to R x R (+ optional h-flip).
Boxes are in DISPLAY pixels (EXIF orientation applied), as the manifest's width/height are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..paper import HFLIP, RRC_RATIO, RRC_SCALE

DRAFT_SCALES = (8, 4, 2, 1)   # JPEG DCT-domain reductions libjpeg (and PIL's draft) can do


@dataclass(frozen=True)
class Crop:
    box: tuple[float, float, float, float]   # x0, y0, x1, y1 in display pixels of the source
    src: tuple[int, int]                     # source display (width, height)
    out: tuple[int, int]                     # output (width, height)
    flip: bool = False

    def relative(self) -> tuple[float, float, float, float]:
        """The box as fractions of the source size: what both decoders consume, so a source decoded at
        a reduced (draft) scale, or a few pixels off the manifest's size, maps the same way."""
        w, h = self.src
        x0, y0, x1, y1 = self.box
        return x0 / w, y0 / h, x1 / w, y1 / h

    def reduction(self) -> float:
        """How many source pixels per output pixel (the smaller of the two axes)."""
        x0, y0, x1, y1 = self.box
        return min((x1 - x0) / self.out[0], (y1 - y0) / self.out[1])

    def padding(self) -> float:
        """Fraction of the output not covered by image content (0 for every crop made here)."""
        x0, y0, x1, y1 = self.box
        w, h = self.src
        inside = max(0.0, min(x1, w) - max(x0, 0.0)) * max(0.0, min(y1, h) - max(y0, 0.0))
        return 1.0 - inside / ((x1 - x0) * (y1 - y0))


def cover(src_w: int, src_h: int, out_w: int, out_h: int, flip: bool = False) -> Crop:
    """Resize-to-cover + centre crop: the largest centred box with the output's aspect."""
    scale = max(out_w / src_w, out_h / src_h)
    bw, bh = min(src_w, out_w / scale), min(src_h, out_h / scale)
    x0, y0 = (src_w - bw) / 2, (src_h - bh) / 2
    return Crop((x0, y0, x0 + bw, y0 + bh), (src_w, src_h), (out_w, out_h), flip)


def random_resized_crop(src_w: int, src_h: int, size: int, rng: np.random.Generator,
                        scale=RRC_SCALE, ratio=RRC_RATIO, hflip: float = HFLIP) -> Crop:
    """torchvision's RandomResizedCrop.get_params (10 tries, then a centre crop clamped to `ratio`),
    with a numpy Generator so the draw is a pure function of its seed."""
    area = src_w * src_h
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    box = None
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(lo, hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= src_w and 0 < h <= src_h:
            y = int(rng.integers(0, src_h - h + 1))
            x = int(rng.integers(0, src_w - w + 1))
            box = (x, y, x + w, y + h)
            break
    if box is None:
        in_ratio = src_w / src_h
        if in_ratio < ratio[0]:
            w, h = src_w, int(round(src_w / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(src_h * ratio[1])), src_h
        else:
            w, h = src_w, src_h
        x, y = (src_w - w) // 2, (src_h - h) // 2
        box = (x, y, x + w, y + h)
    flip = bool(rng.random() < hflip)
    return Crop(tuple(float(v) for v in box), (src_w, src_h), (size, size), flip)


def draft_scale(crop: Crop, reducing_gap: float = 1.0) -> int:
    """The JPEG reduction (1, 2, 4, 8) to decode at: the largest that still leaves at least
    `reducing_gap` source pixels per output pixel, so the final resize never upsamples a draft."""
    r = crop.reduction() / reducing_gap
    return next(d for d in DRAFT_SCALES if d <= max(r, 1.0))
