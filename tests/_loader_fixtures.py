"""A small manifest builder for the loader's tests and benchmarks, written against the manifest contract
(docs/contracts.md) so the loader is tested without the shard stage's code.

Generates JPEGs (some with EXIF orientation, some corrupt if asked), writes img2dataset-style
webdataset tars (KEY.jpg / KEY.txt / KEY.json) with webdataset's TarWriter, indexes them with
`tarfile` (member.offset_data, member.size), and writes samples/part-0.parquet + _manifest.json
with polars, including a bucket table (log-spaced aspects 1:4 .. 4:1, one grid per area).
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import webdataset as wds
from PIL import Image

AREAS = [2**n for n in range(7, 13)]
# The transpose that turns a display image into the stored one for EXIF orientation o
# (the inverse of what ImageOps.exif_transpose applies).
_STORE = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
          6: Image.ROTATE_90, 7: Image.TRANSVERSE, 8: Image.ROTATE_270}


def grid_for(aspect: float, area: int, tol: float) -> tuple[int, int]:
    """(h, w) with h*w <= area: the largest h*w whose aspect is within `tol` (log) of the bucket's,
    ties to the closest aspect; the closest aspect if none is within tol."""
    best, best_key = None, None
    for h in range(1, area + 1):
        w = area // h
        for ww in (w, w - 1):
            if ww < 1:
                continue
            err = abs(math.log(ww / h / aspect))
            key = (err <= tol, h * ww if err <= tol else -err, -err)
            if best_key is None or key > best_key:
                best, best_key = (h, ww), key
    return best


def bucket_table(n: int = 13) -> list[dict]:
    aspects = np.exp(np.linspace(math.log(1 / 4), math.log(4), n))
    tol = (math.log(16) / (n - 1)) / 2
    return [{"id": i, "aspect": float(a), "grids": {str(A): list(grid_for(float(a), A, tol)) for A in AREAS}}
            for i, a in enumerate(aspects)]


def nearest_bucket(table: list[dict], w: int, h: int) -> int:
    la = math.log(w / h)
    return min(table, key=lambda b: abs(math.log(b["aspect"]) - la))["id"]


_PHOTOS = None


def _photo_sources():
    global _PHOTOS
    if _PHOTOS is None:
        from skimage import data

        _PHOTOS = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
                   data.retina(), data.immunohistochemistry()]
    return _PHOTOS


def make_image(w: int, h: int, rng: np.random.Generator, photo: bool = False, grain: float = 3.0) -> Image.Image:
    """A display-orientation RGB image. `photo`: a resized natural image (scikit-image's bundled
    photos) with sensor-like grain, for JPEG sizes and decode costs like real photos; otherwise an
    asymmetric synthetic pattern (gradients + blocks) that makes any flip or rotation visible."""
    if photo:
        src = _photo_sources()[int(rng.integers(len(_photo_sources())))]
        sh, sw = src.shape[:2]
        # A random crop of the source with the target's aspect, then resized to (w, h).
        cw, ch = min(sw, int(sh * w / h)), min(sh, int(sw * h / w))
        x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        im = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC)
        if not grain:
            return im
        a = np.asarray(im).astype(np.int16) + rng.normal(0, grain, (h, w, 1)).astype(np.int16)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    y, x = np.mgrid[0:h, 0:w]
    a = np.zeros((h, w, 3), np.float32)
    a[..., 0] = 255 * x / max(1, w - 1)
    a[..., 1] = 255 * y / max(1, h - 1)
    a[..., 2] = 128 + 100 * np.sin(x / max(2, w / 6)) * np.cos(y / max(2, h / 4))
    a[: h // 3, : w // 4] = rng.integers(0, 256, 3)          # a marker in the top-left corner
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def encode_jpeg(display: Image.Image, orientation: int = 1, quality: int = 90) -> bytes:
    stored = display.transpose(_STORE[orientation]) if orientation != 1 else display
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    b = io.BytesIO()
    stored.save(b, "JPEG", quality=quality, exif=exif.tobytes())
    return b.getvalue()


def build_manifest(root: Path, n: int = 300, *, seed: int = 0, shards: int = 2, min_side: int = 24,
                   max_side: int = 96, aspects: list[float] | None = None, patch_size: int = 14,
                   exif_every: int = 0, corrupt: tuple[int, ...] = (), photo: bool = False,
                   sources=("dfn", "coyo", "hqitp"), synthetic: bool = True, n_buckets: int = 13,
                   quality: int = 90, grain: float = 3.0, parts: int = 1, by_source: bool = False,
                   source_weights=None) -> Path:
    """Write tars under root/tars and a manifest under root/manifest; return the manifest dir.

    Image sizes: long side uniform in [min_side, max_side], aspect drawn from `aspects` (w/h; default
    log-uniform 1:4..4:1). Every `exif_every`-th image carries an EXIF orientation (cycling 2..8).
    Rows listed in `corrupt` get garbage bytes in place of their JPEG (the manifest still lists them).
    `parts`: samples/part-*.parquet files (contiguous runs of rows; `by_source` sorts the rows by source
    first, so that most parts hold one source). `source_weights`: row shares per source (default equal,
    row i from sources[i % len])."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    table = bucket_table(n_buckets)
    tar_dir, man = root / "tars", root / "manifest"
    tar_dir.mkdir(parents=True, exist_ok=True)
    (man / "samples").mkdir(parents=True, exist_ok=True)
    rows = []
    per = math.ceil(n / shards)
    for s in range(shards):
        path = tar_dir / f"{s:05d}.tar"
        meta = {}
        with wds.TarWriter(str(path)) as tw:
            for i in range(s * per, min(n, (s + 1) * per)):
                a = (float(rng.choice(aspects)) if aspects else float(np.exp(rng.uniform(math.log(1 / 4), math.log(4)))))
                long = int(rng.integers(min_side, max_side + 1))
                w, h = (long, max(1, round(long / a))) if a >= 1 else (max(1, round(long * a)), long)
                orient = (2 + (i // exif_every) % 7) if exif_every and i % exif_every == 0 else 1
                img = make_image(w, h, rng, photo, grain)
                data = encode_jpeg(img, orient, quality)
                if i in corrupt:
                    data = b"\xff\xd8\xff\xe0 not a jpeg " + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
                key = f"{s:05d}{i:04d}"
                src = (sources[i % len(sources)] if source_weights is None else
                       sources[int(np.searchsorted(np.cumsum(source_weights) / sum(source_weights),
                                                   (i * 0.6180339887) % 1.0, side="right"))])
                alt = f"alt text {i}" if i % 7 else ""
                syn = [f"synthetic {i} a", f"synthetic {i} b"] if synthetic and src != "coyo" else None
                tw.write({"__key__": key, "jpg": data, "txt": alt,
                          "json": {"key": key, "status": "success", "width": w, "height": h, "source": src}})
                meta[key] = dict(key=key, source=src, uid=f"uid{i}", url=f"https://example.com/{i}.jpg",
                                 sha256=None, format="jpeg", width=w, height=h, orientation=orient,
                                 bucket=nearest_bucket(table, w, h), caption=alt or None, syn_demo=syn)
        with tarfile.open(path) as tf:   # where each image's data starts inside the tar
            for m in tf.getmembers():
                key, ext = m.name.rsplit(".", 1)
                if ext == "jpg":
                    rows.append({**meta[key], "shard": f"../tars/{path.name}", "offset": m.offset_data,
                                 "size": m.size})
    df = pl.DataFrame(rows, schema_overrides={"offset": pl.Int64, "size": pl.Int64, "width": pl.Int32,
                                              "height": pl.Int32, "orientation": pl.Int8, "bucket": pl.Int16,
                                              "sha256": pl.String, "syn_demo": pl.List(pl.String)})
    if by_source:
        df = df.sort("source", maintain_order=True)
    per_part = math.ceil(df.height / parts)
    for k in range(parts):
        tmp = man / "samples" / f"part-{k}.parquet.tmp"
        df[k * per_part:(k + 1) * per_part].write_parquet(tmp)
        tmp.replace(man / "samples" / f"part-{k}.parquet")
    counts = df.group_by("bucket").len().sort("bucket")
    info = {"schema_version": 1, "patch_size": patch_size, "buckets": table,
            "counts": {"buckets": {str(b): c for b, c in counts.iter_rows()},
                       "sources": {s: int((df["source"] == s).sum()) for s in sources}},
            "inputs": [str(tar_dir)], "args": {"fixture": True, "seed": seed}}
    (man / "_manifest.json").write_text(json.dumps(info, indent=1))
    return man
