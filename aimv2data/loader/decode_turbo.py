"""JPEG decoding of only what the crop needs (issue 15, point 5): the crop window, at the smallest
libjpeg-turbo scale that keeps the crop at or above the output size.

Scale. libjpeg-turbo scales a JPEG inside the IDCT: M x M pixels per 8 x 8 block. We decode at the smallest
scale M/8 with M in SCALES that leaves at least DETAILED_GAP[M] (or the loader's `reducing_gap`, if larger)
source pixels per output pixel on both axes of the crop, then Pillow-SIMD resizes the crop box (bicubic,
antialiased) to the output: no full-size intermediate. 1.25 at 1/2: a DCT-domain 1/2 that leaves the resize
almost nothing to do keeps the aliasing of sensor noise, and a generated noisy scene of the demo corpus then
differed from DALI's full decode + antialiased resize by 0.060 (> 0.05) normalised units; at 1.25 the worst
image of the agreement tests is 0.037 (photos) and 0.008 (demo corpus). 1.5 at 1/4 and 1/8, whose 2x2 and
1x1 IDCTs are coarser filters: on 0.6-4 MP grainy photos at native resolution (benchmarks/bench_decode.py,
`large`) 1.25 there gave a mean difference from a full decode of 0.020 and a worst image of 0.068, 1.5 gives
0.017 / 0.047, for 4 % of the throughput. Aliasing needs high-frequency content, and that is what costs a
JPEG its bits: below SMOOTH_BPP = 1 bit per pixel every gap is 1.0 (the benchmark reports the difference
from a full decode per corpus). Only M = 1, 2, 4, 8: libjpeg-turbo has SIMD IDCTs for 1/8 (DC only), 2/8,
4/8 and 8/8, while 3/8, 5/8, 6/8 and 7/8 run its plain-C IDCTs: on generated 0.4 MP photos (one core)
7/8, 6/8 and 5/8 took 3.0, 2.4 and 2.1 ms against 2.1 ms at full size and 1.45 ms at 1/2.
Why not Pillow's `draft`: it is asked for (ceil(w/d), ceil(h/d)) and picks the scale by integer
division, so an image with an odd width or height got NO reduction at d = 2 (and a smaller one at 4 and
8): three in four images of random size were decoded at full size. Here the scale comes from the crop.

Window. `_jpegcrop` (a minimal C binding to the system libjpeg-turbo's libjpeg API, built by
`make install` where the libjpeg62-turbo headers are, which Pillow-SIMD's build needs anyway) decodes
only the rows and columns of the crop box plus the reach of the resize filter (PAD): the IDCT and colour
conversion of the columns beside it and the rows above it are skipped (those rows are Huffman-decoded
only: a JPEG's entropy-coded data has no row index), and decoding stops after the box's last row. The
decoded pixels equal those of a whole-image decode at the same scale, and the resized crop differs by at
most 2 grey levels (tests/test_loader_turbo.py). At fixed 224 it made the decoder 3-21 % faster per CPU
second than the whole-image decode (0.4-4 MP JPEGs; 18 % at the loader level on 0.6-4 MP); at native
resolution the box is nearly the whole image and both run alike (benchmarks/RESULTS.md). No maintained
binding exposes this: simplejpeg and imagecodecs decode whole images, PyTurboJPEG needs TurboJPEG 3's
`tj3SetCroppingRegion` (Debian 12's libturbojpeg0 is 2.1.5) and its `decode()` takes no region anyway.
Without `_jpegcrop` the whole image is decoded at the chosen scale through `simplejpeg` (its wheel ships
libjpeg-turbo 3.1).

What is left at 224 px from 0.4 MP photos is the entropy decoding (about 0.3 of the open_clip-style
baseline's time), the full-size IDCT of the window (no reduced scale keeps the agreement tolerance when the
box is 1.1-2.3 source pixels per output pixel), the resize and the normalisation: 1.5-1.7x the baseline, and
at most 1.7-1.9x with a free IDCT (the bound table in RESULTS.md).

Both decode to RGBX, Pillow's own layout for RGB: `frombuffer` maps the pixels without a copy, where
"RGB" costs an unpack of the whole image (0.3-0.6 ms at 0.4 MP, as much as the resize).

Not handled here (the caller falls back to Pillow): neither binding, bytes that are not a JPEG, CMYK/YCCK
JPEGs (Pillow's Adobe-inversion handling is the reference), images over Pillow's decompression-bomb
limit, and anything libjpeg-turbo reports as damaged, warnings included (strict), so Pillow alone decides
which damaged JPEGs are bad samples, as before.
"""
from __future__ import annotations

import math

from PIL import Image

from .geometry import Crop

try:
    from . import _jpegcrop
except ImportError:          # not built (no compiler or libjpeg-turbo headers at install): whole images
    _jpegcrop = None
try:
    import simplejpeg
except ImportError:          # optional: without either binding the `pil` decoder uses Pillow's draft for JPEGs
    simplejpeg = None

T = Image.Transpose
_COLOUR = {"YCbCr", "RGB", "Gray"}
_INVERSE = {T.ROTATE_90: T.ROTATE_270, T.ROTATE_270: T.ROTATE_90}    # the other transposes undo themselves
_SWAPS = {T.TRANSPOSE, T.TRANSVERSE, T.ROTATE_90, T.ROTATE_270}       # ... and these swap width and height
SCALES = (1, 2, 4, 8)        # M of M/8: libjpeg-turbo's SIMD IDCT sizes (see above)
# Source px per output px left after the DCT-domain scale M/8, by M (see above); 8/8 has no minimum.
DETAILED_GAP = {1: 1.5, 2: 1.5, 4: 1.25}
SMOOTH_GAP = {1: 1.0, 2: 1.0, 4: 1.0}   # JPEGs under SMOOTH_BPP bits per pixel: little to alias
SMOOTH_BPP = 1.0
PAD = 2                      # decoded pixels beyond the resize filter's reach: libjpeg's window edge column


def available() -> bool:
    return _jpegcrop is not None or simplejpeg is not None


def scale_eighths(crop: Crop, reducing_gap: float = 1.0, gaps: dict[int, float] = DETAILED_GAP) -> int:
    """M of the M/8 scale to decode at: the smallest in SCALES that leaves at least
    max(`reducing_gap`, gaps[M]) source pixels per output pixel on both axes of the crop."""
    r = crop.reduction()
    return next((m for m in SCALES[:-1] if r * m / 8 >= max(reducing_gap, gaps[m]) - 1e-9), 8)


def transposed_box(box: tuple, size: tuple[float, float], op: Image.Transpose | None) -> tuple:
    """Where `box` (x0, y0, x1, y1) of an image of `size` (w, h) lies after `image.transpose(op)`."""
    x0, y0, x1, y1 = box
    w, h = size
    return {None: box, T.FLIP_LEFT_RIGHT: (w - x1, y0, w - x0, y1), T.FLIP_TOP_BOTTOM: (x0, h - y1, x1, h - y0),
            T.ROTATE_180: (w - x1, h - y1, w - x0, h - y0), T.TRANSPOSE: (y0, x0, y1, x1),
            T.ROTATE_90: (y0, w - x1, y1, w - x0), T.ROTATE_270: (h - y1, x0, h - y0, x1),
            T.TRANSVERSE: (h - y1, w - x1, h - y0, w - x0)}[op]


def decode_window(data: bytes, crop: Crop, op: Image.Transpose | None = None, reducing_gap: float = 1.0,
                  scale: bool = True) -> tuple[Image.Image, tuple, tuple[int, int]] | None:
    """Encoded bytes -> (RGBX image in display orientation that holds the crop box and the resize filter's
    reach around it, the box in that image's pixels, the display size of the whole image at the decoded
    scale), or None when this path does not apply (see the module docstring). `op`: the transpose that
    displays the stored image (EXIF orientation). `scale=False`: decode at full size."""
    if not available() or not data.startswith(b"\xff\xd8"):
        return None
    w, h = crop.src                                   # display size; same pixel count as stored
    smooth = 8 * len(data) < SMOOTH_BPP * w * h
    m = scale_eighths(crop, reducing_gap, SMOOTH_GAP if smooth else DETAILED_GAP) if scale else 8
    rel = transposed_box(crop.relative(), (1, 1), _INVERSE.get(op, op))     # in the stored image
    got = _window(data, m, rel, crop) if _jpegcrop is not None else _whole(data, m)
    if got is None:
        return None
    im, (x, y), (sw, sh) = got
    box = (rel[0] * sw - x, rel[1] * sh - y, rel[2] * sw - x, rel[3] * sh - y)
    if op is None:
        return im, box, (sw, sh)
    return im.transpose(op), transposed_box(box, im.size, op), (sh, sw) if op in _SWAPS else (sw, sh)


def _limit() -> float:
    """Pillow's decompression-bomb error threshold (0: none): larger images are Pillow's to refuse."""
    return 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else 0


def _window(data: bytes, m: int, rel: tuple, crop: Crop):
    """The crop window (relative box `rel` in stored orientation) at M/8 through `_jpegcrop`."""
    x0, y0, x1, y1 = crop.box
    reach = 2 * max(1.0, (x1 - x0) / crop.out[0] * m / 8, (y1 - y0) / crop.out[1] * m / 8)  # bicubic support
    got = _jpegcrop.decode(data, m, *rel, math.ceil(reach) + PAD, _limit())
    if got is None:
        return None
    pixels, x, y, ww, wh, sw, sh = got
    return Image.frombuffer("RGBX", (ww, wh), pixels, "raw", "RGBX", 0, 1), (x, y), (sw, sh)


def _whole(data: bytes, m: int):
    """The whole image at M/8 through simplejpeg."""
    try:
        h, w, colour, _ = simplejpeg.decode_jpeg_header(data)
        limit = _limit()
        if colour not in _COLOUR or (limit and w * h > limit):
            return None                                   # CMYK/YCCK, or a decompression bomb: Pillow's call
        arr = simplejpeg.decode_jpeg(data, "RGBX", min_width=math.ceil(w * m / 8), min_height=math.ceil(h * m / 8),
                                     strict=True)
    except Exception:         # damaged or unsupported: Pillow decides (and names the problem)
        return None
    return Image.frombuffer("RGBX", (arr.shape[1], arr.shape[0]), arr, "raw", "RGBX", 0, 1), (0, 0), arr.shape[1::-1]
