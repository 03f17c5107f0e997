"""JPEG decoding at the smallest libjpeg-turbo scale that keeps the crop at or above the output size
(issue 15, point 5), through `simplejpeg` (a maintained binding whose wheel ships libjpeg-turbo 3.1).

libjpeg-turbo scales a JPEG inside the IDCT: M x M pixels per 8 x 8 block. We decode at the smallest
scale M/8 with M in SCALES that leaves at least MIN_GAP = 1.25 (or the loader's `reducing_gap`, if
larger) source pixels per output pixel on both axes of the crop, then Pillow-SIMD resizes the crop box
(bicubic, antialiased) to the output: no full-size intermediate. The 1.25: a DCT-domain 1/2 that leaves
the resize almost nothing to do keeps the aliasing of sensor noise, and a generated noisy scene of the
demo corpus then differed from DALI's full decode + antialiased resize by 0.060 (> 0.05) normalised
units; at 1.25 the worst image of the agreement tests is 0.040 (photos) and 0.008 (demo corpus).
Aliasing needs high-frequency content, and that is what costs a JPEG its bits: below SMOOTH_BPP = 1
bit per pixel the gap is 1.0 (benchmarks/bench_decode.py reports the resulting difference from a full
decode per corpus). Only M = 1, 2, 4, 8: libjpeg-turbo has SIMD IDCTs for 1/8 (DC only), 2/8, 4/8
and 8/8, while 3/8, 5/8, 6/8 and 7/8 run its plain-C IDCTs: on generated 0.4 MP photos (one core)
7/8, 6/8 and 5/8 took 3.0, 2.4 and 2.1 ms against 2.1 ms at full size and 1.45 ms at 1/2.

Why not Pillow's `draft`: it is asked for (ceil(w/d), ceil(h/d)) and picks the scale by integer
division, so an image with an odd width or height got NO reduction at d = 2 (and a smaller one at 4 and
8): three in four images of random size were decoded at full size. Here the scale comes from the crop.

Not done: decoding only the crop window (stop after its last row, skip columns outside it). No
maintained binding exposes it on this stack: Debian 12's libturbojpeg0 is 2.1.5 (no TurboJPEG 3
`tj3SetCroppingRegion`), PyTurboJPEG 2.x needs TurboJPEG 3 and its `decode()` takes no region, and
simplejpeg has no region argument. It would save the IDCT and colour work outside the box and the
Huffman decoding below it; the Huffman decoding above it stays, and at reduced scales that is most of
the cost (same photos: 1/8 1.0 ms, 1/4 1.2 ms, 1/2 1.45 ms).

Not handled here (the caller falls back to Pillow): no binding, bytes that are not a JPEG, CMYK/YCCK
JPEGs (Pillow's Adobe-inversion handling is the reference), images over Pillow's decompression-bomb
limit, and anything libjpeg-turbo reports as damaged (strict mode), so Pillow alone decides which
damaged JPEGs are bad samples, as before.
"""
from __future__ import annotations

import math

from PIL import Image

from .geometry import Crop

try:
    import simplejpeg
except ImportError:          # optional: without it the `pil` decoder uses Pillow's draft for JPEGs
    simplejpeg = None

_COLOUR = {"YCbCr", "RGB", "Gray"}
SCALES = (1, 2, 4, 8)        # M of M/8: libjpeg-turbo's SIMD IDCT sizes (see above)
MIN_GAP = 1.25               # source px per output px left after the DCT-domain scale (see above) ...
SMOOTH_BPP = 1.0             # ... or 1.0 for JPEGs under this many bits per pixel: little to alias


def available() -> bool:
    return simplejpeg is not None


def scale_eighths(crop: Crop, reducing_gap: float = 1.0, min_gap: float = MIN_GAP) -> int:
    """M of the M/8 scale to decode at: the smallest in SCALES that leaves at least
    max(`reducing_gap`, `min_gap`) source pixels per output pixel on both axes of the crop."""
    need = 8 * max(reducing_gap, min_gap) / crop.reduction()
    return next((m for m in SCALES if m >= need - 1e-9), 8)


def decode_scaled(data: bytes, crop: Crop, reducing_gap: float = 1.0, scale: bool = True) -> Image.Image | None:
    """Encoded bytes -> an RGB PIL image at M/8 of the stored size (EXIF orientation NOT applied: the
    caller transposes), or None when this path does not apply (see the module docstring). The scale is
    the same on both axes, so the display-space crop needs no transposing to choose it."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    try:
        h, w, colour, _ = simplejpeg.decode_jpeg_header(data)
        if colour not in _COLOUR or (Image.MAX_IMAGE_PIXELS and w * h > 2 * Image.MAX_IMAGE_PIXELS):
            return None                                   # CMYK/YCCK, or a decompression bomb: Pillow's call
        smooth = 8 * len(data) < SMOOTH_BPP * w * h
        m = scale_eighths(crop, reducing_gap, 1.0 if smooth else MIN_GAP) if scale else 8
        arr = simplejpeg.decode_jpeg(data, "RGB", min_width=math.ceil(w * m / 8), min_height=math.ceil(h * m / 8),
                                     strict=True)
    except Exception:         # damaged or unsupported: Pillow decides (and names the problem)
        return None
    return Image.frombuffer("RGB", (arr.shape[1], arr.shape[0]), arr, "raw", "RGB", 0, 1)

