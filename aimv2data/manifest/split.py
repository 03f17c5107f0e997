"""Split a manifest into train and held-out (val) manifests by a hash of the sample key.

A sample goes to val when `blake2b(key) / 2^64 < val_fraction`: a pure function of the key, so the split
is the same on every machine and every rerun, a sample is never in both halves, and re-sharding the
same data (or growing it) keeps every old sample on its side. Both outputs are ordinary manifests
(manifests/SPEC.md): `samples/*.parquet` (the same parts, filtered; shard paths rewritten relative to
the new directory, or kept absolute), `_manifest.json` with the counts recomputed and a `split` entry
saying where they came from. Rejects stay in the source manifest (they are in neither half).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl

from ..atomic import atomic_write
from . import layout
from .integrity import open_meta


def key_fraction(key: str) -> float:
    """The key's deterministic position in [0, 1)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64


def _rebase(shards: pl.Series, src: Path, dst: Path, relative: bool) -> pl.Series:
    if not relative:
        return shards
    rel = {s: os.path.relpath((src / s).resolve(), dst.resolve()) for s in shards.unique().to_list()}
    return shards.replace_strict(rel, return_dtype=pl.String)


def split_manifest(manifest: str | os.PathLike, out: str | os.PathLike, val_fraction: float) -> dict:
    """Write OUT/train and OUT/val from MANIFEST; returns {"train": n, "val": n, "train_dir", "val_dir"}."""
    src, out = Path(manifest), Path(out)
    meta = open_meta(src)   # missing, damaged or of an unknown schema: one line naming it (a ValueError)
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    sides = {"train": out / "train", "val": out / "val"}
    if src.resolve() in {out.resolve(), *(d.resolve() for d in sides.values())}:
        raise ValueError(f"-o {out} would overwrite the source manifest: choose another directory")
    relative = meta.get("paths", "relative") == "relative"
    parts = layout.sample_files(src)
    if not parts:
        raise ValueError(f"no samples/*.parquet under {src}: the manifest is empty or unfinished")
    counts = {side: {"samples": 0, "captions": 0, "per_bucket": Counter(), "per_source": Counter(),
                     "per_format": Counter(), "shards": set()} for side in sides}
    for part in parts:
        df = pl.read_parquet(part)
        is_val = np.fromiter((key_fraction(k) < val_fraction for k in df["key"].to_list()), bool, len(df))
        for side, d in sides.items():
            sub = df.filter(pl.Series(is_val if side == "val" else ~is_val))
            path = d / layout.SAMPLES / part.name
            if not len(sub):
                path.unlink(missing_ok=True)  # a rerun with another fraction
                continue
            c = counts[side]
            c["samples"] += len(sub)
            c["captions"] += int(sub["caption"].is_not_null().sum()) if "caption" in sub.columns else 0
            c["per_bucket"].update(str(b) for b in sub["bucket"].to_list())
            c["per_source"].update(sub["source"].to_list())
            if "format" in sub.columns:
                c["per_format"].update(sub["format"].to_list())
            c["shards"].update(sub["shard"].unique().to_list())
            sub = sub.with_columns(_rebase(sub["shard"], src, d, relative).alias("shard"))
            atomic_write(path, lambda tmp, sub=sub: sub.write_parquet(tmp))
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for side, d in sides.items():
        c = counts[side]
        per_bucket = {str(b): c["per_bucket"].get(str(b), 0) for b in map(int, meta["counts"]["per_bucket"])}
        new = dict(meta)
        new.update(created=now, updated=now, files={"samples": layout.SAMPLES_GLOB},
                   counts={**meta["counts"], "shards": len(c["shards"]), "samples": c["samples"], "rejects": 0,
                           "captions": c["captions"], "per_bucket": per_bucket,
                           "per_source": dict(c["per_source"].most_common()),
                           "per_format": dict(c["per_format"].most_common()), "per_reason": {}},
                   split={"from": str(src.resolve()), "side": side, "val_fraction": val_fraction,
                          "rule": "blake2b-64(key) / 2^64 < val_fraction -> val"})
        # written last: a directory with _manifest.json is a finished split
        atomic_write(layout.manifest_json(d), lambda tmp, new=new: Path(tmp).write_text(json.dumps(new, indent=2)))
    return {"train": counts["train"]["samples"], "val": counts["val"]["samples"],
            "train_dir": str(sides["train"]), "val_dir": str(sides["val"])}
