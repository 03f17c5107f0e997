"""Helpers for the fetch and demo tests: read what fetch wrote, snapshot a directory."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import polars as pl


def read_shards(out: Path) -> dict[str, dict]:
    """key -> {"tar", "jpg" bytes, "txt", "json"} for every sample in every DIR/*.tar."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                s = samples.setdefault(key, {"tar": tar_path.name})
                assert ext not in s, f"duplicate member {m.name} in {tar_path}"
                data = tf.extractfile(m).read()
                s[ext] = json.loads(data) if ext == "json" else data.decode() if ext == "txt" else data
    return samples


def tar_keys(out: Path) -> list[str]:
    """Every image key in every tar, duplicates kept (a test asserts there are none)."""
    keys = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
    return keys


def status_table(out: Path) -> pl.DataFrame:
    """img2dataset's per-sample status rows from every DIR/*.parquet."""
    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))], how="diagonal_relaxed")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under root but the lock file, whose holder line each
    run rewrites (aimv2data/manifest/lock.py)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def summary(out: Path) -> dict:
    return json.loads((out / "fetch_summary.json").read_text())


def decode(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im
