"""The manifest as the loader sees it.

`Manifest`: the cheap, whole-manifest part every rank reads alike, O(parts) and never O(rows): the
bucket table of `_manifest.json`, and per parquet *row group* (a "chunk") its file, row count and, from
the footer statistics of `source`, which source it holds. `SampleTable`: the rows of some chunks (one
rank's share of one source for one epoch) as numpy arrays (numbers as they are, text as Arrow-style
offsets + UTF-8 bytes), sorted by (shard, key).

Plain numpy because forked worker processes share it copy-on-write and must not call into polars:
polars' thread pool does not survive fork() (a child that touches it deadlocks).

Only the manifest contract is used (docs/contracts.md, manifests/SPEC.md): no code from the shard side.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

AREAS = tuple(2**n for n in range(7, 13))  # 128 .. 4096 patches
REQUIRED = ("key", "shard", "offset", "size", "width", "height", "bucket")
OPTIONAL_TEXT = ("source", "caption")
ANY = None   # a chunk whose footer does not name a single source: it may hold any source


class ManifestError(ValueError):
    """The manifest is missing something the loader needs."""


@dataclass(frozen=True)
class Bucket:
    id: int
    aspect: float                              # w / h
    grids: dict[int, tuple[int, int]]          # area A -> (h, w) patches, h*w <= A


def norm_source(name: str | None) -> str:
    """Source names match case-insensitively, ignoring punctuation (`"DFN"` == `"dfn"`)."""
    return re.sub(r"[^a-z0-9]", "", (name or "").lower())


class Manifest:
    """MANIFEST/{_manifest.json, samples/*.parquet} without reading a row: buckets, chunks (one per parquet
    row group, in (file name, row group) order), sources. Costs one footer read per part."""

    def __init__(self, manifest: str | Path):
        import pyarrow.parquet as pq

        self.root = Path(manifest)
        meta_path = self.root / "_manifest.json"
        if not meta_path.is_file():
            raise ManifestError(f"{meta_path} not found: pass a manifest directory written by `aimv2 shard`")
        meta = json.loads(meta_path.read_text())
        self.meta = meta
        self.patch_size = int(meta.get("patch_size", 14))
        self._meta_path = meta_path
        self._buckets = None
        self.files = sorted((self.root / "samples").glob("*.parquet"))
        if not self.files:
            raise ManifestError(f"no samples/*.parquet under {self.root}: the manifest is empty or unfinished "
                                "(rerun `aimv2 shard`, it resumes)")
        file_idx, rg_idx, rows, srcs = [], [], [], []
        self._spelled: dict[str, str] = {}
        self.columns: list[list[str]] = []
        for i, f in enumerate(self.files):
            md = pq.ParquetFile(f).metadata
            names = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)]
            cols = list(dict.fromkeys(names))
            missing = [c for c in REQUIRED if c not in cols]
            if missing:
                raise ManifestError(f"{f}: missing columns {missing}; the loader needs {list(REQUIRED)} "
                                    "(manifests/SPEC.md); rebuild the manifest with `aimv2 shard`")
            self.columns.append(cols)
            j_src = names.index("source") if "source" in names else None
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                if rg.num_rows == 0:
                    continue
                file_idx.append(i)
                rg_idx.append(g)
                rows.append(rg.num_rows)
                srcs.append(_single_source(rg, j_src, self._spelled))
        if not rows:
            raise ManifestError(f"{self.root}: the manifest has no samples")
        self.chunk_file = np.array(file_idx, dtype=np.int32)
        self.chunk_group = np.array(rg_idx, dtype=np.int32)
        self.chunk_rows = np.array(rows, dtype=np.int64)
        self.chunk_source = srcs                  # normalised name, "" (no source column) or ANY
        self.n = int(self.chunk_rows.sum())
        self.has_source = any("source" in c for c in self.columns)
        self.sources = self._sources()
        h = hashlib.sha1(f"chunks:{self.n}".encode())
        for f, g, r in zip(self.chunk_file.tolist(), self.chunk_group.tolist(), rows):
            h.update(f"{self.files[f].name}:{g}:{r};".encode())
        self.fingerprint = h.hexdigest()[:16]

    @property
    def buckets(self) -> dict[int, Bucket]:
        if self._buckets is None:
            self._buckets = _read_buckets(self.meta, self._meta_path)
        return self._buckets

    def _sources(self) -> dict[str, str]:
        """normalised name -> the name as the manifest spells it. From the chunks' footer statistics when
        every chunk names one source; else from `_manifest.json` counts; else (slow, O(rows)) the column."""
        if not self.has_source:
            return {"": ""}
        if all(s is not ANY for s in self.chunk_source):
            names = {s for s in self.chunk_source}
            spelled = dict(self._spelled)
            return {s: spelled.get(s, s) for s in sorted(names)}
        counts = self.meta.get("counts", {})
        listed = counts.get("per_source") or counts.get("sources")
        if listed:
            return {norm_source(k): k for k in sorted(listed)}
        names = set()
        for f, cols in zip(self.files, self.columns):
            if "source" in cols:
                names |= set(pl.read_parquet(f, columns=["source"])["source"].unique().to_list())
        return {norm_source(k): k for k in sorted(n for n in names if n is not None)}

    def chunks_of(self, source: str) -> np.ndarray:
        """Chunk ids that may hold rows of `source` (normalised name)."""
        return np.array([i for i, s in enumerate(self.chunk_source) if s is ANY or s == source], dtype=np.int64)

    def chunk_key(self, i: int) -> int:
        """A stable 63-bit id of chunk i (file name, row group): the same whatever else is in the manifest."""
        d = hashlib.blake2b(f"{self.files[self.chunk_file[i]].name}:{self.chunk_group[i]}".encode(), digest_size=8)
        return int.from_bytes(d.digest(), "little") >> 1


def _single_source(rg, j, spelled: dict) -> str | None:
    if j is None:
        return ""
    st = rg.column(j).statistics
    if st is None or not st.has_min_max or st.min != st.max or st.null_count:
        return ANY
    spelled[norm_source(st.min)] = st.min
    return norm_source(st.min)


class SampleTable:
    """Read-only view of the rows of some chunks (optionally only one source's), sorted by (shard, key);
    row i is sample i everywhere. `SampleTable(manifest)` reads every chunk."""

    def __init__(self, manifest, chunks=None, source: str | None = None):
        import pyarrow.parquet as pq

        m = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        self.manifest, self.root, self.meta = m, m.root, m.meta
        self.patch_size = m.patch_size
        chunks = np.arange(len(m.chunk_rows)) if chunks is None else np.asarray(chunks, dtype=np.int64)
        self.chunks = chunks
        frames = []
        for f in sorted(set(m.chunk_file[chunks].tolist())):
            cols = m.columns[f]
            want = [c for c in cols if c in REQUIRED or c in OPTIONAL_TEXT or c in ("format", "orientation")
                    or c.startswith("syn_")]
            groups = sorted(int(m.chunk_group[c]) for c in chunks if m.chunk_file[c] == f)
            frames.append(pl.from_arrow(pq.ParquetFile(m.files[f]).read_row_groups(groups, columns=want)))
        df = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
        if source is not None and "source" in df.columns:
            df = df.filter(_source_mask(df["source"], source))
        if df.height == 0 and source is None:
            raise ManifestError(f"{self.root}: the manifest has no samples")
        # Rows in (shard, key) order, not file order: img2dataset's download threads write a shard's samples
        # in the order they finish, so two fetches of the same list give the same rows in another order.
        # Sorted, the same samples and the same seed give the same batches (and the same trained weights).
        df = df.sort(["shard", "key"], maintain_order=True)
        self.buckets = m.buckets
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
        self.shard_names = names
        self.shards = [str(self._resolve(s)) for s in names]
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

    def _resolve(self, shard: str) -> Path:
        p = Path(shard)
        return p if p.is_absolute() else (self.root / p)

    def counts(self) -> dict[int, int]:
        return {b: len(m) for b, m in self.members.items()}

    def grid(self, bucket: int, area: int) -> tuple[int, int]:
        return self.buckets[bucket].grids[area]

    def key(self, row: int) -> str:
        return self.text["key"][row]

    def uid(self, row: int) -> int:
        """A stable 63-bit id of the sample (its shard and key): keys its crop and caption draws, so they
        do not depend on which rank reads it or where it sits in the manifest."""
        d = hashlib.blake2b(f"{self.shard_names[self.shard_idx[row]]}\0{self.key(row)}".encode(), digest_size=8)
        return int.from_bytes(d.digest(), "little") >> 1

    def texts(self, row: int) -> dict:
        """source, caption and synthetic captions of one row (None where absent)."""
        return {c: col[row] for c, col in self.text.items()}


def _source_mask(col: pl.Series, source: str) -> pl.Series:
    names = col.unique().to_list()
    keep = [n for n in names if norm_source(n) == source]
    return col.is_in(keep).fill_null(source == "")


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
