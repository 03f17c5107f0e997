"""What an image member is, without decoding its pixels: format, display size (EXIF orientation applied),
mode, and whether its bytes are complete enough for DALI to decode.

DALI's decoder aborts the whole pipeline on one bad image, so whatever this module keeps must decode.
The checks, by `verify` level (each includes the ones above it):

  header  PIL reads the headers (size, mode, frames, EXIF); then each file is checked to its end:
          JPEG header segments up to the first scan and an EOI after it, PNG chunk CRCs through IEND
          (PIL's verify()), WebP RIFF chunk sizes. No pixel is decoded. Catches truncation, which is
          what breaks DALI in practice (a JPEG without EOI, a PNG without IEND, a short RIFF).
  draft   JPEG: reduced-scale (1/8) DCT decode; PNG and WebP: full decode.
  decode  full decode of everything.

Every rejection is a `Rejected(reason, detail)`; reasons are the stable strings listed in
manifests/SPEC.md.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

VERIFY_LEVELS = ("header", "draft", "decode")
DEFAULT_MAX_PIXELS = 178_956_970         # fetch's default too (aimv2data/fetch/options.py): 2x PIL's MAX_IMAGE_PIXELS,
                                         # where PIL itself refuses; an image fetch keeps, shard keeps

# Content signatures: the member extension is not trusted, the bytes are.
_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x0a", "JPEG-XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG-XL"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG-2000"), (b"\xff\x4f\xff\x51", "JPEG-2000"),
)
_PIL_FORMAT = {"jpeg": ["JPEG", "MPO"], "png": ["PNG"], "webp": ["WEBP"]}


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class ImageInfo:
    format: str          # jpeg | png | webp (from the bytes)
    width: int           # display size: EXIF orientation applied
    height: int
    orientation: int     # EXIF 1..8, 1 when absent or unreadable
    mode: str            # PIL mode of the stored image: RGB, L, CMYK, P, RGBA, LA, I;16, 1, ...
    alpha: bool          # has transparency (alpha channel or tRNS)
    bit_depth: int       # bits per channel sample: 8, or 1/2/4/16 for such PNGs
    exif_error: bool = False


def sniff(data: bytes) -> str:
    """'jpeg' | 'png' | 'webp', or the name of another image format, or raise Rejected."""
    if not data:
        raise Rejected("empty_file", "0 bytes")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "AVIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        return "HEIF"
    for sig, name in _SIGNATURES:
        if data.startswith(sig):
            return name
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        raise Rejected("not_an_image", "HTML document")
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:2048].lower()):
        return "SVG"
    if head.startswith((b"<", b"{", b"[")):
        raise Rejected("not_an_image", f"text/markup starting {data[:16]!r}")
    raise Rejected("not_an_image", f"unknown signature {data[:8].hex(' ')}")


def inspect_image(data: bytes, verify: str = "header", max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    fmt = sniff(data)
    if fmt not in _PIL_FORMAT:
        raise Rejected(f"unsupported_format:{fmt}", "only JPEG, PNG and WebP are kept (what both decoders read)")
    if fmt == "jpeg":       # byte-level walks first: they name truncation precisely
        _walk_jpeg(data)
    elif fmt == "webp":
        _walk_riff(data)
    im = _open(data, fmt)
    w, h = im.size
    if w < 1 or h < 1:
        raise Rejected("corrupt", f"header says {w}x{h}")
    if w * h > max_pixels:  # checked on the header, before any pixel buffer exists
        raise Rejected("decompression_bomb", f"{w}x{h} = {w * h / 1e6:.1f} MP > limit {max_pixels / 1e6:.1f} MP")
    # Multi-frame: MPO (camera JPEGs with a second picture) decodes as its primary JPEG everywhere;
    # APNG / animated WebP are rejected (see SPEC: their first frame is often blank or a fade-in).
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1 and im.format != "MPO":
        raise Rejected("animated", f"{im.format} with {n_frames} frames")
    mode = im.mode
    alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    bit_depth = _png_bit_depth(data) if fmt == "png" else 8
    orientation, exif_error = _orientation(im)
    if fmt == "png":
        _verify_png(im)
    if verify != "header":
        _decode(data, fmt, draft=(verify == "draft" and fmt == "jpeg"))
    if orientation in (5, 6, 7, 8):         # transposed: display w/h are the stored h/w
        w, h = h, w
    return ImageInfo(fmt, w, h, orientation, mode, alpha, bit_depth, exif_error)


def _open(data: bytes, fmt: str) -> Image.Image:
    # PIL's own bomb check is off while opening (we check the header size against our limit instead,
    # so a bomb is a rejection with its size, never a PIL exception or warning). Restored at once.
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data), formats=_PIL_FORMAT[fmt])
    except (UnidentifiedImageError, SyntaxError, OSError, ValueError, struct.error, IndexError, EOFError) as e:
        raise Rejected(_reason(e), f"{fmt} header: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _reason(e: Exception) -> str:
    return "truncated" if "truncat" in str(e).lower() else "corrupt"


def _orientation(im: Image.Image) -> tuple[int, bool]:
    """EXIF tag 274 from the EXIF block PIL found in the headers (JPEG APP1, PNG eXIf before IDAT, WebP
    EXIF chunk). Not im.getexif(): for PNG that decodes the whole image, and it also honours XMP
    orientation, which DALI's decoder does not."""
    raw = im.info.get("exif")
    if not raw:
        return 1, False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exif = Image.Exif()
            exif.load(raw)
            o = int(exif.get(0x0112, 1))
    except Exception:  # malformed EXIF is common on the web; the image itself may be fine
        return 1, True
    if not 1 <= o <= 8:
        return 1, True
    return o, bool(caught)   # PIL warns (and reads what it can) on a damaged EXIF block


def _png_bit_depth(data: bytes) -> int:
    return data[24] if len(data) > 24 else 8   # IHDR: 8 sig + 4 len + 4 type + 4 w + 4 h, then depth


# --- container walks -------------------------------------------------------------------------------

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF_OK = {0xC0, 0xC1, 0xC2}   # baseline, extended sequential, progressive (Huffman): what decoders share


def _verify_png(im: Image.Image) -> None:
    try:
        im.verify()   # chunk CRCs through IEND; no zlib inflate
    except Exception as e:
        raise Rejected(_reason(e), f"png: {e}") from None


def _walk_jpeg(data: bytes) -> None:
    """SOI and the header segments up to the first scan (frame type checked on the way), then an EOI
    after it. 0xFF 0xD9 cannot occur inside entropy-coded data (an 0xFF there is followed by 0x00 or a
    restart marker), so the last EOI in the file, found with one rfind, says the scans were not cut
    short; this is what a truncated download fails, and what makes DALI abort (PIL too). Trailing bytes
    after EOI are fine for every decoder. For MPO the primary image is the one decoders read."""
    n, pos, sof = len(data), 2, None
    while True:
        if pos + 4 > n:
            raise Rejected("truncated", f"jpeg: ends at byte {n}, inside the headers")
        if data[pos] != 0xFF:
            raise Rejected("corrupt", f"jpeg: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        marker = data[pos + 1]
        if marker == 0xFF:                      # fill byte
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            pos += 2
            continue
        if marker == 0xD9:
            raise Rejected("corrupt", f"jpeg: EOI at byte {pos} before any scan")
        seglen = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 2 + seglen
        if seglen < 2:
            raise Rejected("corrupt", f"jpeg: segment 0xFF{marker:02X} at byte {pos} has length {seglen}")
        if end > n:
            raise Rejected("truncated", f"jpeg: segment 0xFF{marker:02X} at byte {pos} runs past the end")
        if marker in _SOF and sof is None:
            sof = marker
            precision = data[pos + 4]
            if marker not in _SOF_OK or precision != 8:
                kind = {0xC3: "lossless", 0xC9: "arithmetic", 0xCA: "arithmetic"}.get(marker, f"SOF{marker - 0xC0}")
                raise Rejected(f"unsupported_format:JPEG-{kind if precision == 8 else f'{precision}bit'}",
                               "only 8-bit baseline/progressive Huffman JPEGs decode the same everywhere")
        if marker == 0xDA:                      # first scan
            if sof is None:
                raise Rejected("corrupt", "jpeg: scan before any frame header")
            if data.rfind(b"\xff\xd9", end) < 0:
                raise Rejected("truncated", f"jpeg: no EOI after the scan data starting at byte {end}")
            return
        pos = end


def _walk_riff(data: bytes) -> None:
    n = len(data)
    riff_size = struct.unpack_from("<I", data, 4)[0] if n >= 12 else 0
    end = 8 + riff_size
    if n < 12 or end > n:
        raise Rejected("truncated", f"webp: RIFF says {end} bytes, file has {n}")
    pos, image_chunk = 12, False
    while pos + 8 <= end:
        fourcc = data[pos:pos + 4]
        size = struct.unpack_from("<I", data, pos + 4)[0]
        pos += 8 + size + (size & 1)
        if pos > end + (size & 1):
            raise Rejected("truncated", f"webp: chunk {fourcc!r} runs past the RIFF end")
        image_chunk |= fourcc in (b"VP8 ", b"VP8L", b"ANMF")
    if not image_chunk:
        raise Rejected("corrupt", "webp: no VP8/VP8L image chunk")


def _decode(data: bytes, fmt: str, draft: bool) -> None:
    im = _open(data, fmt)
    try:
        if draft:
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    except Exception as e:
        raise Rejected(_reason(e), f"{fmt} decode: {e}") from None
