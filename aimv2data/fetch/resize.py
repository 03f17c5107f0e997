"""What `aimv2 fetch` does to each downloaded image: keep it byte for byte when it already is what
the loaders want (a complete baseline JPEG no larger than --max-side), otherwise decode, downscale
if too large and re-encode as baseline JPEG. Refuses bad bodies with a named reason.

It is a subclass of img2dataset's Resizer (same constructor, same return tuple) so img2dataset's
Downloader calls it per image in its worker threads. Why not img2dataset's own resizer:
- it decodes every image in full before any size check, so a 20000x20000 PNG costs 1.2 GB (more with
  alpha) before `max_image_area` refuses it; we read the size from the header first;
- with `skip_reencode` it keeps progressive JPEGs (slow path for nvJPEG) and drops the EXIF
  orientation of everything it re-encodes (a rotated photo would come out sideways);
- it accepts truncated JPEGs (libjpeg only warns) and reports HTML, empty and corrupt bodies alike
  as "Image decoding error".
"""
from __future__ import annotations

import io
import os
import struct

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) checks PyPI otherwise

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from img2dataset.resizer import Resizer, ResizeMode  # noqa: E402

from aimv2data.fetch.options import DEFAULT_MAX_PIXELS  # noqa: E402


# Error strings: img2dataset counts them per shard (status_dict) and stores them per sample
# (error_message); summary.reason_class maps them to short reason names.
ERR_EMPTY = "empty body"
ERR_HTML = "HTML/XML page instead of an image"
ERR_TRUNCATED = "truncated JPEG (no end-of-image marker)"
ERR_UNDECODABLE = "undecodable image bytes"
ERR_TOO_LARGE = "image too large"  # followed by the size and the limit


def jpeg_is_complete(data: bytes) -> bool:
    """True when a JPEG has its end-of-image marker after the first scan. Walks the marker
    segments (skipping EXIF thumbnails, which carry their own FFD9) up to the first SOS; in
    entropy-coded data 0xFF is always stuffed, so a later FF D9 can only be the real EOI."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i) != -1
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert a minimal EXIF APP1 segment carrying only `orientation` after SOI (and JFIF APP0),
    so a re-encoded image keeps displaying the way its source did. Lossless, ~40 bytes."""
    tiff = b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + b"\0" * 4
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    pos = 2
    if jpeg[2:4] == b"\xff\xe0":
        pos = 4 + int.from_bytes(jpeg[4:6], "big")
    return jpeg[:pos] + app1 + jpeg[pos:]


def inspect_header(data: bytes) -> dict | None:
    """Format, size, progressive flag, mode and EXIF orientation from the header only (Pillow
    opens lazily: no pixel is decoded). None when Pillow cannot identify the bytes. Raises
    PIL.Image.DecompressionBombError for images beyond Pillow's own limit."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # a malformed EXIF block must not lose the image
                orientation = 1
            return {
                "format": im.format, "width": im.width, "height": im.height, "mode": im.mode,
                "progressive": bool(im.info.get("progressive") or im.info.get("progression")),
                "orientation": orientation if 1 <= orientation <= 8 else 1,
            }
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        return None


class NativeResizer(Resizer):
    """img2dataset Resizer for native-resolution pre-training data. Honoured constructor options:
    image_size + resize_mode (keep_ratio_largest: downscale when the long side is larger, or `no`),
    max_image_area (refused before decoding), min_image_size, max_aspect_ratio, encode_quality.
    Always writes JPEG; `keep_progressive` keeps progressive JPEGs as they are."""

    def __init__(self, *args, keep_progressive: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if self.resize_mode not in (ResizeMode.keep_ratio_largest, ResizeMode.no):
            raise ValueError(f"NativeResizer supports resize_mode keep_ratio_largest or no, not {self.resize_mode.name}")
        if self.encode_format != "jpg":
            raise ValueError("NativeResizer writes JPEG: use encode_format='jpg'")
        self.keep_progressive = keep_progressive

    def __call__(self, img_stream, blurring_bbox_list=None):
        """-> (image bytes, width, height, original_width, original_height, error message)"""
        from PIL import Image

        def fail(msg):
            return None, None, None, None, None, msg

        try:
            img_stream.seek(0)
            data = img_stream.read()
            if not data:
                return fail(ERR_EMPTY)
            if data[:256].lstrip()[:1] == b"<":
                return fail(ERR_HTML)
            try:
                info = inspect_header(data)
            except Image.DecompressionBombError as e:
                if self.max_image_area <= DEFAULT_MAX_PIXELS:
                    return fail(f"{ERR_TOO_LARGE}: {e}")
                info = None  # the user raised the limit above Pillow's: let OpenCV's guard decide
            orientation = 1
            if info is not None:
                w, h, orientation = info["width"], info["height"], info["orientation"]
                if w * h > self.max_image_area:
                    return fail(f"{ERR_TOO_LARGE}: {w}x{h} = {w * h} pixels > limit {int(self.max_image_area)}")
                if min(w, h) < self.min_image_size:
                    return fail("image too small")
                if max(w, h) / max(1, min(w, h)) > self.max_aspect_ratio:
                    return fail("aspect ratio too large")
                if info["format"] == "JPEG" and not jpeg_is_complete(data):
                    return fail(ERR_TRUNCATED)
                too_big = self.resize_mode != ResizeMode.no and max(w, h) > self.image_size
                baseline = not info["progressive"] or self.keep_progressive
                if info["format"] == "JPEG" and info["mode"] in ("L", "RGB") and baseline and not too_big:
                    return data, w, h, w, h, None  # already what the loaders want: keep every byte
            return self._reencode(data, orientation)
        except Exception as err:  # img2dataset counts the message; a worker must never die on one image
            return fail(str(err))

    def _reencode(self, data: bytes, orientation: int):
        cv2.setNumThreads(1)
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as e:  # OpenCV's own pixel cap (OPENCV_IO_MAX_IMAGE_PIXELS), set by fetch
            msg = f"{ERR_TOO_LARGE}: {e}" if "CV_IO_MAX_IMAGE_PIXELS" in str(e) else f"{ERR_UNDECODABLE}: {e}"
            return None, None, None, None, None, msg.strip()
        if img is None:
            return None, None, None, None, None, ERR_UNDECODABLE
        if img.dtype == np.uint16:
            img = (img >> 8).astype(np.uint8)
        elif img.dtype != np.uint8:
            img = cv2.normalize(img, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
        if img.ndim == 3 and img.shape[2] == 4:  # alpha: composite on white, as img2dataset does
            alpha = img[:, :, 3:4].astype(np.float32) / 255.0
            img = np.rint(alpha * img[:, :, :3] + (1.0 - alpha) * 255.0).clip(0, 255).astype(np.uint8)
        elif img.ndim == 3 and img.shape[2] == 1:
            img = img[:, :, 0]
        oh, ow = img.shape[:2]
        if ow * oh > self.max_image_area:
            return None, None, None, None, None, f"{ERR_TOO_LARGE}: {ow}x{oh} pixels"
        if self.resize_mode != ResizeMode.no and max(ow, oh) > self.image_size:
            s = self.image_size / max(ow, oh)
            size = (max(1, round(ow * s)), max(1, round(oh * s)))
            img = cv2.resize(img, size, interpolation=self.downscale_interpolation)
        h, w = img.shape[:2]
        ok, buf = cv2.imencode(".jpg", img, self.encode_params)  # OpenCV writes baseline JPEG
        if not ok:
            return None, None, None, None, None, "JPEG encoding failed"
        out = buf.tobytes()
        if orientation != 1:
            out = with_orientation(out, orientation)
        return out, w, h, ow, oh, None
