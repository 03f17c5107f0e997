"""The manifest as the loader sees it: per-sample columns as numpy arrays (numbers as they are, text as
Arrow-style offsets + UTF-8 bytes), and the bucket table read from `_manifest.json`.

Plain numpy because forked worker processes share it copy-on-write and must not call into polars:
polars' thread pool does not survive fork() (a child that touches it deadlocks).

Only the manifest contract is used (docs/contracts.md, manifests/SPEC.md): no code from the shard side.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from ..manifest.integrity import check_rows, read_part, read_schema, sample_parts

AREAS = tuple(2**n for n in range(7, 13))  # 128 .. 4096 patches
REQUIRED = ("key", "shard", "offset", "size", "width", "height", "bucket")
OPTIONAL_TEXT = ("source", "caption")


class ManifestError(ValueError):
    """The manifest is missing something the loader needs."""


@dataclass(frozen=True)
class Bucket:
    id: int
    aspect: float                              # w / h
    grids: dict[int, tuple[int, int]]          # area A -> (h, w) patches, h*w <= A


class SampleTable:
    """Read-only view of MANIFEST/{_manifest.json, samples/*.parquet}, rows sorted by (shard, key); row i
    is sample i everywhere."""

    def __init__(self, manifest: str | Path):
        self.root = Path(manifest)
        meta_path = self.root / "_manifest.json"
        if not meta_path.is_file():
            raise ManifestError(f"{meta_path} not found: pass a manifest directory written by `aimv2 shard`")
        meta = json.loads(meta_path.read_text())
        self.meta = meta
        self.patch_size = int(meta.get("patch_size", 14))
        self.buckets = _read_buckets(meta, meta_path)

        files = sample_parts(self.root, meta)   # the parts _manifest.json lists, no more, no fewer
        if not files:
            raise ManifestError(f"no samples/*.parquet under {self.root}: the manifest is empty or unfinished "
                                "(rerun `aimv2 shard`, it resumes)")
        frames = []
        for f in files:
            cols = read_schema(f)
            missing = [c for c in REQUIRED if c not in cols]
            if missing:
                raise ManifestError(f"{f}: missing columns {missing}; the loader needs {list(REQUIRED)} "
                                    "(manifests/SPEC.md); rebuild the manifest with `aimv2 shard`")
            want = [c for c in cols if c in REQUIRED or c in OPTIONAL_TEXT or c in ("format", "orientation")
                    or c.startswith("syn_")]
            frames.append(read_part(f, want))
        df = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
        if df.height == 0:
            raise ManifestError(f"{self.root}: the manifest has no samples")
        check_rows(self.root, meta, df.height)
        # Rows in (shard, key) order, not file order: img2dataset's download threads write a shard's samples
        # in the order they finish, so two fetches of the same list give the same rows in another order.
        # Sorted, the same samples and the same seed give the same batches (and the same trained weights).
        # Cost at start-up, 10M rows on 2 cores: 0.2 s when nearly in order (a fetch's output), 8 s shuffled.
        df = df.sort(["shard", "key"], maintain_order=True)

        nulls = {c: n for c, n in df.select(pl.col(list(REQUIRED)).null_count()).row(0, named=True).items() if n}
        if nulls:
            raise ManifestError(f"{self.root}: null values in required columns {nulls}")
        self.n = df.height
        self.bucket = df["bucket"].cast(pl.Int32).to_numpy()
        self.width = df["width"].cast(pl.Int32).to_numpy()
        self.height = df["height"].cast(pl.Int32).to_numpy()
        self.offset = df["offset"].cast(pl.Int64).to_numpy()
        self.size = df["size"].cast(pl.Int64).to_numpy()
        # EXIF orientation as the shard stage read it (tag 274, what DALI applies); None: not recorded.
        self.orientation = (df["orientation"].fill_null(1).cast(pl.Int8).to_numpy()
                            if "orientation" in df.columns else None)
        fmt = df["format"] if "format" in df.columns else pl.Series(["jpeg"] * self.n)
        self.is_jpeg = fmt.str.to_lowercase().is_in(["jpeg", "jpg"]).fill_null(False).to_numpy()
        if (self.width <= 0).any() or (self.height <= 0).any():
            bad = df.filter((pl.col("width") <= 0) | (pl.col("height") <= 0))["key"].head(3).to_list()
            raise ManifestError(f"{self.root}: samples with non-positive width/height, e.g. {bad}")
        unknown = sorted(set(np.unique(self.bucket).tolist()) - set(self.buckets))
        if unknown:
            raise ManifestError(f"{self.root}: samples use buckets {unknown[:5]} that _manifest.json does not define")

        # Shards: one small table of paths, an int32 index per sample.
        names = df["shard"].unique(maintain_order=True).to_list()
        if any(s is None for s in names):
            raise ManifestError(f"{self.root}: samples with a null `shard`")
        self.shards = [str(self._resolve(s)) for s in names]
        # Tars moved or deleted since the build: all gone is a one-line error here (not 16 failed
        # replacements deep in a step); some gone is what the loader's replacements are for, counted.
        self.missing_shards = [p for p in self.shards if not os.path.exists(p)]
        if len(self.missing_shards) == len(self.shards):
            raise ManifestError(f"{self.root}: none of its {len(self.shards)} tars exists (e.g. {self.shards[0]}); "
                                "were they moved? `shard` paths are relative to the manifest directory: move them "
                                "back, or rebuild the manifest with `aimv2 shard` over their new place")
        self.shard_idx = df["shard"].replace_strict({s: i for i, s in enumerate(names)},
                                                    return_dtype=pl.Int32).to_numpy()

        self.syn_columns = sorted(c for c in df.columns if c.startswith("syn_"))
        self.text = {c: Strings.from_series(df[c]) for c in ("key", *OPTIONAL_TEXT) if c in df.columns}
        self.text.update({c: StringLists.from_series(df[c]) for c in self.syn_columns})
        # Rows per bucket in (shard, key) order; the sampler permutes these each epoch.
        order = np.argsort(self.bucket, kind="stable")
        ids, starts = np.unique(self.bucket[order], return_index=True)
        ends = np.append(starts[1:], len(order))
        self.members = {int(b): order[s:e] for b, s, e in zip(ids, starts, ends)}
        self.fingerprint = self._fingerprint(df)

    def _resolve(self, shard: str) -> Path:
        p = Path(shard)
        return p if p.is_absolute() else (self.root / p)

    def _fingerprint(self, df: pl.DataFrame) -> str:
        # Cheap and stable across library versions: row count, byte totals, first/last keys.
        keys = df["key"]
        h = hashlib.sha1()
        h.update(f"{self.n}:{int(self.size.sum())}:{int(self.offset.sum())}".encode())
        for k in keys.head(256).to_list() + keys.tail(256).to_list():
            h.update(str(k).encode())
        return h.hexdigest()[:16]

    def counts(self) -> dict[int, int]:
        return {b: len(m) for b, m in self.members.items()}

    def grid(self, bucket: int, area: int) -> tuple[int, int]:
        return self.buckets[bucket].grids[area]

    def key(self, row: int) -> str:
        return self.text["key"][row]

    def texts(self, row: int) -> dict:
        """source, caption and synthetic captions of one row (None where absent)."""
        return {c: col[row] for c, col in self.text.items()}


def _arrow(series: pl.Series):
    import pyarrow as pa

    arr = series.to_arrow(compat_level=pl.CompatLevel.oldest())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


class Strings:
    """A string column as offsets (int64, n+1) + UTF-8 bytes + a null mask: pure numpy."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray, null: np.ndarray):
        self.offsets, self.data, self.null = offsets, data, null

    @classmethod
    def from_series(cls, series: pl.Series) -> "Strings":
        arr = _arrow(series.cast(pl.String))
        _, off, data = arr.buffers()
        offsets = np.frombuffer(off, dtype=np.int64)[arr.offset:arr.offset + len(arr) + 1].copy()
        data = np.frombuffer(data, dtype=np.uint8).copy() if data is not None else np.zeros(0, np.uint8)
        return cls(offsets, data, arr.is_null().to_numpy(zero_copy_only=False))

    def __len__(self) -> int:
        return len(self.null)

    def __getitem__(self, i: int) -> str | None:
        if self.null[i]:
            return None
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


class StringLists:
    """A list[str] column: list offsets over a `Strings` of all entries."""

    def __init__(self, offsets: np.ndarray, values: Strings, null: np.ndarray):
        self.offsets, self.values, self.null = offsets, values, null

    @classmethod
    def from_series(cls, series: pl.Series) -> "StringLists":
        if not isinstance(series.dtype, pl.List):
            raise ManifestError(f"column {series.name} must be list[str] (synthetic captions), got {series.dtype}")
        arr = _arrow(series)
        offsets = arr.offsets.to_numpy().astype(np.int64)
        values = Strings.from_series(pl.Series(arr.values))
        return cls(offsets, values, arr.is_null().to_numpy(zero_copy_only=False))

    def __len__(self) -> int:
        return len(self.null)

    def __getitem__(self, i: int) -> list[str] | None:
        if self.null[i]:
            return None
        return [v for v in (self.values[j] for j in range(self.offsets[i], self.offsets[i + 1])) if v]


def _read_buckets(meta: dict, where: Path) -> dict[int, Bucket]:
    table = meta.get("buckets")
    if not table:
        raise ManifestError(f"{where}: no `buckets` table; the loader needs bucket grids per area "
                            "(manifests/SPEC.md); rebuild the manifest with `aimv2 shard`")
    out = {}
    for b in table:
        try:
            grids = {int(a): (int(hw[0]), int(hw[1])) for a, hw in b["grids"].items()}
            bucket = Bucket(int(b["id"]), float(b["aspect"]), grids)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ManifestError(f"{where}: malformed bucket entry {b!r} ({e}); expected "
                                '{"id", "aspect", "grids": {"128": [h, w], ...}}') from None
        missing = [a for a in AREAS if a not in grids]
        if missing:
            raise ManifestError(f"{where}: bucket {bucket.id} has no grid for areas {missing}")
        for a, (h, w) in grids.items():
            if h < 1 or w < 1 or h * w > a:
                raise ManifestError(f"{where}: bucket {bucket.id} grid {h}x{w} does not fit area {a}")
        out[bucket.id] = bucket
    return out
