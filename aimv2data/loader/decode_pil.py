"""The `pil` decoder: Pillow(-SIMD), one image at a time, in the loader's worker processes.

Speed comes from decoding only what the crop needs. JPEGs go first to `decode_turbo` (libjpeg-turbo: the
crop window only, at the smallest of 1/8, 1/4, 1/2, 1/1 that keeps the crop above the output size); what
it does not take (no binding, not a JPEG, CMYK, damaged, no orientation column) comes here to Pillow, where
`Image.draft` asks libjpeg for the image at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling: fewer IDCT
outputs, less colour conversion, a smaller resize) whenever the source box has at least that many pixels
per output pixel. The crop box is given as fractions of the source, so it maps onto a reduced decode
unchanged.

Both paths resize in RGBX (Pillow's layout for RGB); each output is packed to RGB and copied into the
batch's uint8 channels-last buffer (batch.empty_images): the batch leaves the worker as uint8 and the model
normalises it on the device (docs/contracts.md), so no float work is left on the host.

EXIF orientation is applied after the draft (the manifest's width/height are display sizes): the
transposes of `ImageOps.exif_transpose`, driven by the manifest's `orientation` column when it has one.
The shard stage reads that column from EXIF tag 274 exactly as DALI's decoder applies it; PIL's own
`exif_transpose` (used when the column is absent) would also honour an XMP orientation that DALI
ignores, and the two decoders would disagree on such images.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageOps

from ..batch import empty_images
from . import decode_turbo
from .geometry import Crop, draft_scale
from .validate import jpeg_problem

# Pillow's decompression-bomb limit stays as it is: the manifest builder's default cap is the same 2x
# MAX_IMAGE_PIXELS, so nothing it kept is refused here, and a process that imports the loader keeps
# its protection elsewhere.

# EXIF orientation -> the transpose that displays it (the table of ImageOps.exif_transpose).
TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def _check_size(size: tuple[int, int], crop: Crop) -> None:
    """The decoded image (display orientation, any scale) must have the manifest's orientation."""
    (iw, ih), (w, h) = size, crop.src
    if (iw > ih) != (w > h) and abs(iw - ih) > 1 and abs(w - h) > 1:
        raise ValueError(f"decoded image is {iw}x{ih} but the manifest says {w}x{h} (orientation mismatch)")


def _finish(im: Image.Image, box: tuple, crop: Crop) -> Image.Image:
    """The crop `box` (in `im`'s pixels) resized (bicubic, antialiased) to the output, flipped if asked."""
    out = im.resize(crop.out, Image.BICUBIC, box=box)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if crop.flip else out


class PilDecoder:
    name = "pil"

    def __init__(self, draft: bool = True, reducing_gap: float = 1.0, turbo: bool = True):
        self.draft = draft
        self.reducing_gap = reducing_gap
        self.turbo = turbo and decode_turbo.available()

    def decode(self, data: bytes, crop: Crop, orientation: int | None = None) -> np.ndarray:
        """Encoded bytes -> uint8 (H, W, 3) of the crop, resized (bicubic) and flipped as asked.
        `orientation`: the manifest's EXIF orientation (None: read it from the file)."""
        return np.asarray(self.image(data, crop, orientation))[..., :3]

    def image(self, data: bytes, crop: Crop, orientation: int | None = None) -> Image.Image:
        """`decode` as a PIL image, RGB or RGBX (the libjpeg-turbo path's layout, kept to the batch buffer)."""
        if (damaged := jpeg_problem(data)) is not None:  # the rule the dali decoder applies too
            raise ValueError(damaged)
        if self.turbo and orientation is not None:     # JPEG: the crop window at the smallest M/8 scale
            got = decode_turbo.decode_window(data, crop, TRANSPOSE.get(orientation), self.reducing_gap,
                                             scale=self.draft)
            if got is not None:
                im, box, size = got
                _check_size(size, crop)
                return _finish(im, box, crop)
        im = Image.open(io.BytesIO(data))
        if self.draft and im.format == "JPEG":
            d = draft_scale(crop, self.reducing_gap)
            if d > 1:
                im.draft("RGB", (math.ceil(im.width / d), math.ceil(im.height / d)))
        if orientation is None:
            ImageOps.exif_transpose(im, in_place=True)  # loads (decodes) the image
        elif orientation in TRANSPOSE:
            im = im.transpose(TRANSPOSE[orientation])
        else:                                           # 1, or a value outside the EXIF range
            im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        _check_size(im.size, crop)
        rx0, ry0, rx1, ry1 = crop.relative()
        return _finish(im, (rx0 * im.width, ry0 * im.height, rx1 * im.width, ry1 * im.height), crop)

    def decode_batch(self, datas: list[bytes], crops: list[Crop],
                     orientations: list[int] | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """-> (uint8 (B, 3, H, W) in channels-last memory, {slot: reason} for samples that failed; their
        slots hold zeros and are overwritten by the loader's replacements)."""
        w, h = crops[0].out
        images = empty_images(len(datas), h, w)
        buf = images.permute(0, 2, 3, 1).numpy()          # the same memory, (B, H, W, 3)
        failed = {}
        for i, (data, crop) in enumerate(zip(datas, crops)):
            try:
                im = self.image(data, crop, None if orientations is None else orientations[i])
                # packed to RGB by Pillow in one pass (0.035 ms at 224 px; convert("RGB") + asarray 0.08,
                # numpy's strided copy of 3 of 4 bytes 0.3), then one copy into the slot
                buf[i] = np.frombuffer(im.tobytes("raw", "RGB"), np.uint8).reshape(h, w, 3)
            except Exception as e:  # any decoder failure is a bad sample: replaced and counted upstream
                failed[i] = f"{type(e).__name__}: {e}"
        return images, failed

    def close(self) -> None:
        pass
