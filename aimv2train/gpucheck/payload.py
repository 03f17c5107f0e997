"""The trainer part's data, built here on CPU and carried to the GPU machine (`aimv2 bench gpu --prepare DIR`):
real photos (scikit-image's bundled samples, aimv2data.demo_corpus.PHOTOS) cut into many different baseline
JPEGs, written as img2dataset-style tars, sharded into a manifest (paths relative to it, so the folder can
move) and a sentencepiece tokenizer over their captions, at most `max_mb` in all (40 MB: with the working tree
it fits one device call of 64 MiB).

    DIR/shards/00000.tar ...   DIR/manifest/   DIR/tok.model   DIR/payload.json (what is in it, sha256 of each file)

Every picture is a 4:3 landscape crop, so the manifest holds one aspect bucket: a native-resolution run then
compiles one static graph per area it draws, not per (area, bucket) (docs/gpucheck.md, "Time budget").
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np

PAYLOAD_JSON = "payload.json"
NOT_PHOTOS = ("colorwheel", "logo", "page", "text")   # demo_corpus.PHOTOS that are graphics or scans
VIEWS = ("a close-up", "a wide view", "seen from the left", "seen from the right", "mirrored", "in soft light",
         "cropped tight", "at a small size", "slightly darker", "slightly brighter")
ASPECT = 4 / 3
SHARD_SIZE = 64
OVERHEAD = 700_000   # bytes of the manifest and tokenizer (~0.5 MB) beside the tars, with a margin
TAR_SHARE = 1.05     # tar bytes per JPEG byte: three 512-byte headers and padding per ~60 KB sample


def prepare(out: str | Path, *, max_mb: float = 40.0, long_side: tuple[int, int] = (400, 900),
            max_images: int = 4096, seed: int = 0) -> dict:
    """Write the payload into `out` (a new or empty folder); returns payload.json's content."""
    from aimv2data.manifest.build import build_manifest

    from ..train.tokenizer import train_tokenizer

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: --prepare writes a new payload into a new folder")
    t0 = time.perf_counter()
    shards = out / "shards"
    shards.mkdir(parents=True)
    limit = int(max_mb * 1e6)
    images = _write_shards(shards, max_bytes=int((limit - OVERHEAD) / TAR_SHARE), long_side=long_side,
                           max_images=max_images, seed=seed)
    build_manifest([str(shards)], out / "manifest", progress=False)
    train_tokenizer(out / "manifest", out / "tok.model", vocab_size=1024, soft_limit=True)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    if total > limit:
        raise ValueError(f"the payload came to {total / 1e6:.1f} MB, over --max-mb {max_mb}: lower --max-mb")
    info = {"images": images["count"], "megapixels_mean": images["megapixels_mean"],
            "jpeg_bytes_mean": images["bytes"] / max(1, images["count"]), "aspect": "4:3 (one bucket)",
            "photos": images["photos"], "manifest": "manifest", "tokenizer": "tok.model",
            "bytes": total, "seconds": round(time.perf_counter() - t0, 1),
            "sha256": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
    (out / PAYLOAD_JSON).write_text(json.dumps(info, indent=1))
    return info


def _photos() -> list[tuple[str, np.ndarray]]:
    from aimv2data.demo_corpus import PHOTOS, load_photo

    out = []
    for name, caption, *_ in PHOTOS:
        if name in NOT_PHOTOS:
            continue
        img = load_photo(name)
        img = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
        out.append((caption, np.ascontiguousarray(img)))
    return out


def _variant(img: np.ndarray, rng: np.random.Generator, long_side: tuple[int, int]) -> bytes:
    """A random 4:3 crop of a photo (55-100 % of the largest 4:3 window), maybe mirrored, resized to a long
    side in `long_side`, a baseline JPEG of quality 85-95."""
    from PIL import Image

    h, w = img.shape[:2]
    cw, ch = (w, int(w / ASPECT)) if w / h <= ASPECT else (int(h * ASPECT), h)
    s = rng.uniform(0.55, 1.0)
    cw, ch = max(8, int(cw * s)), max(6, int(ch * s))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    pic = Image.fromarray(img[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        pic = pic.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    lw = int(rng.integers(long_side[0], long_side[1] + 1))
    pic = pic.resize((lw, round(lw / ASPECT)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pic.save(buf, "JPEG", quality=int(rng.integers(85, 96)), progressive=False)
    return buf.getvalue()


def _write_shards(shards: Path, *, max_bytes: int, long_side: tuple[int, int], max_images: int, seed: int) -> dict:
    """img2dataset-style tars (key.jpg, key.txt, key.json) of photo variants until `max_bytes` or `max_images`."""
    photos = _photos()
    rng = np.random.default_rng(seed)
    total, pixels, i, tar = 0, 0, 0, None
    try:
        while i < max_images:
            caption, img = photos[i % len(photos)]
            data = _variant(img, rng, long_side)
            if total + len(data) > max_bytes:
                break
            if i % SHARD_SIZE == 0:
                if tar is not None:
                    tar.close()
                tar = tarfile.open(shards / f"{i // SHARD_SIZE:05d}.tar", "w")
            _add_sample(tar, f"{i:09d}", data, f"{caption}, {VIEWS[int(rng.integers(len(VIEWS)))]}")
            total, i = total + len(data), i + 1
            pixels += _size(data)[0] * _size(data)[1]
    finally:
        if tar is not None:
            tar.close()
    return {"count": i, "bytes": total, "megapixels_mean": pixels / max(1, i) / 1e6, "photos": len(photos)}


def _size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(data)).size


def _add_sample(tar: tarfile.TarFile, key: str, jpeg: bytes, caption: str) -> None:
    w, h = _size(jpeg)
    meta = json.dumps({"key": key, "status": "success", "url": f"http://gpucheck/{key}.jpg", "width": w,
                       "height": h, "caption": caption}).encode()
    for ext, payload in (("jpg", jpeg), ("txt", caption.encode()), ("json", meta)):
        ti = tarfile.TarInfo(f"{key}.{ext}")
        ti.size = len(payload)
        tar.addfile(ti, io.BytesIO(payload))


def load(folder: str | Path) -> dict:
    """A carried payload's manifest and tokenizer paths, after checking every file against payload.json."""
    folder = Path(folder)
    meta_path = folder / PAYLOAD_JSON
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: build the payload with `aimv2 bench gpu --prepare "
                                f"{folder}` and carry the whole folder")
    meta = json.loads(meta_path.read_text())
    bad = [rel for rel, digest in meta["sha256"].items()
           if not (folder / rel).is_file() or hashlib.sha256((folder / rel).read_bytes()).hexdigest() != digest]
    if bad:
        raise ValueError(f"{folder}: {len(bad)} file(s) missing or changed since --prepare (first {bad[0]}): "
                         "carry the folder again")
    return {"manifest": str(folder / meta["manifest"]), "tokenizer": str(folder / meta["tokenizer"]),
            "payload": {k: meta[k] for k in ("images", "megapixels_mean", "jpeg_bytes_mean", "bytes", "aspect")}}
