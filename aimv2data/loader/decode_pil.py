"""The `pil` decoder: Pillow(-SIMD), one image at a time, in the loader's worker processes.

Speed comes from JPEG reduced-scale decoding. JPEGs go first to `decode_turbo` (libjpeg-turbo 3 via
simplejpeg, at the smallest of 1/8, 1/4, 1/2, 1/1 that keeps the crop above the output size); what it
does not take (no binding, not a JPEG, CMYK, damaged, no orientation column) comes here to Pillow, where
`Image.draft` asks libjpeg for the image at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling: fewer IDCT
outputs, less colour conversion, a smaller resize) whenever the source box has at least that many pixels
per output pixel. The crop box is given as fractions of the source, so it maps onto a reduced decode
unchanged.

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

from ..batch import MEAN, STD
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


_SCALE = torch.tensor([1 / (255 * s) for s in STD]).view(1, 3, 1, 1)
_SHIFT = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)


def normalized(buf: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> contiguous float32 (B, 3, H, W), CLIP-normalised: one uint8 transpose and one
    fused multiply-add (batch.normalize_'s (x - 255m) / 255s to within 1e-6; half its time on a
    channels-last view)."""
    x = torch.from_numpy(buf).permute(0, 3, 1, 2).contiguous().float()
    return x.mul_(_SCALE).add_(_SHIFT)


class PilDecoder:
    name = "pil"

    def __init__(self, draft: bool = True, reducing_gap: float = 1.0, turbo: bool = True):
        self.draft = draft
        self.reducing_gap = reducing_gap
        self.turbo = turbo and decode_turbo.available()

    def decode(self, data: bytes, crop: Crop, orientation: int | None = None) -> np.ndarray:
        """Encoded bytes -> uint8 (H, W, 3) of the crop, resized (bicubic) and flipped as asked.
        `orientation`: the manifest's EXIF orientation (None: read it from the file)."""
        if (damaged := jpeg_problem(data)) is not None:  # the rule the dali decoder applies too
            raise ValueError(damaged)
        im = None
        if self.turbo and orientation is not None:     # JPEG at the smallest M/8 scale (decode_turbo.py)
            im = decode_turbo.decode_scaled(data, crop, self.reducing_gap, scale=self.draft)
        if im is not None:
            if orientation in TRANSPOSE:
                im = im.transpose(TRANSPOSE[orientation])
            return self._finish(im, crop)
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
        return self._finish(im, crop)

    @staticmethod
    def _finish(im: Image.Image, crop: Crop) -> np.ndarray:
        """A decoded RGB image in display orientation (any scale) -> the crop, resized and flipped."""
        w, h = crop.src
        if (im.width > im.height) != (w > h) and abs(im.width - im.height) > 1 and abs(w - h) > 1:
            raise ValueError(f"decoded image is {im.width}x{im.height} but the manifest says {w}x{h} "
                             "(orientation mismatch)")
        rx0, ry0, rx1, ry1 = crop.relative()
        box = (rx0 * im.width, ry0 * im.height, rx1 * im.width, ry1 * im.height)
        out = im.resize(crop.out, Image.BICUBIC, box=box)
        if crop.flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out)

    def decode_batch(self, datas: list[bytes], crops: list[Crop],
                     orientations: list[int] | None = None) -> tuple[torch.Tensor, dict[int, str]]:
        """-> (float32 (B, 3, H, W) normalised, {slot: reason} for samples that failed; their slots hold
        no image and are overwritten by the loader's replacements)."""
        w, h = crops[0].out
        buf = np.zeros((len(datas), h, w, 3), dtype=np.uint8)
        failed = {}
        for i, (data, crop) in enumerate(zip(datas, crops)):
            try:
                buf[i] = self.decode(data, crop, None if orientations is None else orientations[i])
            except Exception as e:  # any decoder failure is a bad sample: replaced and counted upstream
                failed[i] = f"{type(e).__name__}: {e}"
        return normalized(buf), failed

    def close(self) -> None:
        pass
