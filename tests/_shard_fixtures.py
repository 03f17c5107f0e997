"""Builders for the shard tests: images of every awkward kind, and tars in img2dataset's webdataset layout
(KEY.jpg + KEY.txt + KEY.json, written with webdataset's TarWriter like img2dataset does) or raw.

`catalogue()` is the hostile corpus: one case per kind of input a web crawl produces, each with what
the manifest must do with it: keep it (with its display size) or reject it (with this reason).
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image


def picture(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, and orientation mistakes are visible."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + 2 * y) % 256], -1)
    a = (a + rng.integers(-12, 12, a.shape)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(a, "RGB")
    return im if mode == "RGB" else im.convert(mode)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def jpeg(w=64, h=48, seed=0, orientation=None, **kw) -> bytes:
    if orientation is not None:
        ex = Image.Exif()
        ex[0x0112] = orientation
        kw["exif"] = ex.tobytes()
    return encode(picture(w, h, seed), "JPEG", quality=90, **kw)


def png_raw(w: int, h: int, bit_depth: int, color_type: int, rows: bytes, extra: bytes = b"") -> bytes:
    """A PNG written chunk by chunk (for bit depths/colour types PIL does not write)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def png16_rgb(w=40, h=30, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    rows = b"".join(b"\x00" + rng.integers(0, 65535, w * 3, dtype=np.uint16).astype(">u2").tobytes() for _ in range(h))
    return png_raw(w, h, 16, 2, rows)


@lru_cache(maxsize=None)
def png_bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A w x h 1-bit all-black PNG: ~50 KB on disk, 400 MP (1.2 GB as RGB) when decoded."""
    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (w + 7) // 8)
    body = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def jpeg_with_size(w: int, h: int) -> bytes:
    """A small valid JPEG whose frame header claims w x h (a bomb by header)."""
    data = bytearray(jpeg(64, 48))
    i = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, h, w)
    return bytes(data)


def jpeg_sof(marker: int) -> bytes:
    data = bytearray(jpeg(64, 48))
    data[data.index(b"\xff\xc0") + 1] = marker
    return bytes(data)


def png_bad_crc() -> bytes:
    d = bytearray(encode(picture(40, 30), "PNG"))
    i = d.index(b"IDAT")
    d[i + 10] ^= 0xFF   # corrupt IDAT data; its CRC no longer matches
    return bytes(d)


def png_bad_zlib_good_crc() -> bytes:
    """CRCs all valid, but the IDAT payload is not a zlib stream: only a decode notices."""
    rows = b"".join(b"\x00" + bytes(40 * 3) for _ in range(30))
    good = png_raw(40, 30, 8, 2, rows)
    i = good.index(b"IDAT")
    n = struct.unpack(">I", good[i - 4:i])[0]
    junk = bytes(range(256)) * (n // 256 + 1)
    payload = junk[:n]
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + payload) & 0xFFFFFFFF)
    return good[:i + 4] + payload + crc + good[i + 4 + n + 4:]


def webp_alpha_damaged() -> bytes:
    """Lossy WebP with alpha whose ALPH chunk payload is overwritten (sizes intact)."""
    rgba = picture(200, 150, 40, "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((200, 150)))
    d = bytearray(encode(rgba, "WEBP", quality=80))
    i = d.index(b"ALPH")
    n = struct.unpack_from("<I", d, i + 4)[0]
    for k in range(i + 8 + 1, i + 8 + n):
        d[k] ^= 0x5A
    return bytes(d)


def animated(fmt: str) -> bytes:
    frames = [picture(40, 30, s) for s in range(3)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def flipped_middle(data: bytes, n: int = 40) -> bytes:
    d = bytearray(data)
    mid = len(d) // 2
    for i in range(mid, mid + n):
        d[i] ^= 0x55
    return bytes(d)


@dataclass
class Case:
    name: str
    ext: str                          # member extension of the image ("" = no image member)
    data: bytes | None
    expect: str                       # "keep" or the reject reason
    size: tuple[int, int] | None = None   # expected DISPLAY (width, height) when kept
    caption: bytes | None = b"a caption"
    meta: dict = field(default_factory=dict)
    fmt: str | None = None            # expected format when kept
    mode: str | None = None


def catalogue() -> list[Case]:
    c = []
    # --- kept ---
    c.append(Case("rgb_jpeg", "jpg", jpeg(320, 240, 1), "keep", (320, 240), fmt="jpeg", mode="RGB"))
    c.append(Case("progressive", "jpg", jpeg(120, 90, 2, progressive=True), "keep", (120, 90), fmt="jpeg"))
    c.append(Case("gray_jpeg", "jpg", encode(picture(50, 70, 3, "L"), "JPEG"), "keep", (50, 70), mode="L"))
    c.append(Case("cmyk_jpeg", "jpg", encode(picture(60, 40, 4, "CMYK"), "JPEG"), "keep", (60, 40), mode="CMYK"))
    for o in range(1, 9):   # stored 64x48; 5..8 transpose
        c.append(Case(f"exif_{o}", "jpg", jpeg(64, 48, 10 + o, orientation=o), "keep",
                      (48, 64) if o >= 5 else (64, 48)))
    c.append(Case("mpo", "jpg", encode(picture(80, 60, 5), "MPO", save_all=True, append_images=[picture(80, 60, 6)]),
                  "keep", (80, 60), fmt="jpeg"))
    c.append(Case("trailing_garbage", "jpg", jpeg(64, 48, 7) + b"<html>tracking</html>" * 5, "keep", (64, 48)))
    c.append(Case("flipped_entropy", "jpg", flipped_middle(jpeg(320, 240, 8)), "keep", (320, 240)))
    c.append(Case("png_as_jpg", "jpg", encode(picture(30, 20, 9), "PNG"), "keep", (30, 20), fmt="png"))
    c.append(Case("rgb_png", "png", encode(picture(90, 60, 11), "PNG"), "keep", (90, 60), fmt="png", mode="RGB"))
    c.append(Case("gray16_png", "png", encode(Image.fromarray(
        np.random.default_rng(0).integers(0, 65535, (30, 40), dtype=np.uint16)), "PNG"), "keep", (40, 30), mode="I;16"))
    c.append(Case("rgb16_png", "png", png16_rgb(40, 30), "keep", (40, 30), fmt="png"))
    pal = picture(50, 40, 12).convert("P")
    c.append(Case("palette_trns", "png", encode(pal, "PNG", transparency=0), "keep", (50, 40), mode="P"))
    c.append(Case("rgba_png", "png", encode(picture(40, 40, 13, "RGBA"), "PNG"), "keep", (40, 40), mode="RGBA"))
    c.append(Case("la_png", "png", encode(picture(40, 30, 14, "LA"), "PNG"), "keep", (40, 30), mode="LA"))
    c.append(Case("bilevel_png", "png", encode(picture(40, 30, 15, "1"), "PNG"), "keep", (40, 30), mode="1"))
    ex = Image.Exif()
    ex[0x0112] = 6
    c.append(Case("exif6_png", "png", encode(picture(40, 30, 16), "PNG", exif=ex.tobytes()), "keep", (30, 40)))
    c.append(Case("webp", "webp", encode(picture(100, 50, 17), "WEBP"), "keep", (100, 50), fmt="webp"))
    rgba = picture(60, 40, 18, "RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((60, 40)))
    c.append(Case("webp_alpha", "webp", encode(rgba, "WEBP", lossless=True), "keep", (60, 40), mode="RGBA"))
    c.append(Case("exif6_webp", "webp", encode(picture(40, 30, 19), "WEBP", exif=ex.tobytes()), "keep", (30, 40)))
    c.append(Case("caption_latin1", "jpg", jpeg(40, 30, 20), "keep", (40, 30), caption="café crème".encode("latin-1")))
    c.append(Case("caption_empty", "jpg", jpeg(40, 30, 21), "keep", (40, 30), caption=b"   \n"))
    c.append(Case("caption_in_json", "jpg", jpeg(40, 30, 22), "keep", (40, 30), caption=None,
                  meta={"caption": "from the json"}))
    # --- rejected ---
    j = jpeg(320, 240, 30)
    c.append(Case("truncated_jpeg", "jpg", j[:len(j) * 6 // 10], "truncated"))
    c.append(Case("truncated_progressive", "jpg", jpeg(320, 240, 31, progressive=True)[:-200], "truncated"))
    p = encode(picture(90, 60, 32), "PNG")
    c.append(Case("truncated_png", "png", p[:len(p) // 2], "truncated"))
    w = encode(picture(100, 50, 33), "WEBP")
    c.append(Case("truncated_webp", "webp", w[:len(w) * 8 // 10], "truncated"))
    c.append(Case("zero_byte", "jpg", b"", "empty_file"))
    c.append(Case("html", "jpg", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "not_an_image"))
    c.append(Case("random_bytes", "jpg", np.random.default_rng(5).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
                  "not_an_image"))
    c.append(Case("gif", "jpg", encode(picture(40, 30, 34), "GIF"), "unsupported_format:GIF"))
    c.append(Case("bmp", "jpg", encode(picture(40, 30, 35), "BMP"), "unsupported_format:BMP"))
    c.append(Case("animated_webp", "webp", animated("WEBP"), "animated"))
    c.append(Case("apng", "png", animated("PNG"), "animated"))
    c.append(Case("png_bomb", "png", png_bomb(), "decompression_bomb"))
    c.append(Case("jpeg_bomb", "jpg", jpeg_with_size(60000, 60000), "decompression_bomb"))
    c.append(Case("png_bad_crc", "png", png_bad_crc(), "corrupt"))
    c.append(Case("jpeg_lossless", "jpg", jpeg_sof(0xC3), "unsupported_format:JPEG-lossless"))
    c.append(Case("extreme_aspect", "jpg", jpeg(400, 20, 36), "extreme_aspect"))
    c.append(Case("missing_image", "", None, "missing_image"))
    for i, case in enumerate(c):
        case.meta = {"url": f"http://example.com/{case.name}", "status": "success", "uid": f"uid{i:04d}",
                     "source": "hostile", **case.meta}
    return c


def bitrot() -> list[Case]:
    """Damage inside the compressed data with every container checksum/size intact: the `header` level
    keeps these (it decodes no pixels), `draft`/`decode` reject them as corrupt, and DALI cannot decode
    them. Crawled data is damaged by truncation, not like this; see manifests/SPEC.md."""
    c = [Case("png_bad_zlib", "png", png_bad_zlib_good_crc(), "corrupt", (40, 30)),
         Case("webp_alpha_bitflip", "webp", webp_alpha_damaged(), "corrupt", (200, 150))]
    for i, case in enumerate(c):
        case.meta = {"url": f"http://example.com/{case.name}", "uid": f"rot{i}", "source": "bitrot"}
    return c


def write_img2dataset_tar(path, cases: list[Case], start: int = 0) -> dict[str, Case]:
    """Write `cases` as an img2dataset shard (webdataset's TarWriter, keys 000000000...); returns key -> case."""
    import webdataset as wds

    keys = {}
    with wds.TarWriter(str(path), encoder=False) as tw:
        for i, case in enumerate(cases):
            key = f"{start + i:09d}"
            keys[key] = case
            meta = {"key": key, "width": None, "height": None, **case.meta}
            if case.size:
                meta.update(width=case.size[0], height=case.size[1])
            sample = {"__key__": key, "json": json.dumps(meta, indent=4).encode()}
            if case.data is not None:
                sample[case.ext] = case.data
            if case.caption is not None:
                sample["txt"] = case.caption
            tw.write(sample)
    return keys


def write_raw_tar(path, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def good_tar(path, n: int, start: int = 0, seed: int = 0, source: str | None = None) -> dict[str, Case]:
    """n ordinary JPEG samples of varied sizes and aspects."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        w, h = int(rng.integers(40, 200)), int(rng.integers(40, 200))
        meta = {"url": f"http://example.com/good/{start + i}", "uid": f"g{start + i}", "sha256": None}
        if source:
            meta["source"] = source
        cases.append(Case(f"good{start + i}", "jpg", jpeg(w, h, seed * 1000 + i), "keep", (w, h),
                          caption=f"good picture {start + i}".encode(), meta=meta))
    return write_img2dataset_tar(path, cases, start)
