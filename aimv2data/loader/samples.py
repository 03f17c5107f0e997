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
import os
import re
import threading
from array import array
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from aimv2data import paper
from aimv2data.manifest import layout

from ..manifest.integrity import ManifestMismatch, check_rows, damaged, open_meta, sample_parts
from ..storage import StorageError, is_url, missing, open_file, resolve_against, upath

AREAS = paper.AREAS  # 128 .. 4096 patches
REQUIRED = ("key", "shard", "offset", "size", "width", "height", "bucket")
OPTIONAL_TEXT = ("source", "caption")
URL_CHECKS = 8   # tars of a share at URLs whose existence is checked when the share is read (a HEAD each)
ANY = None   # a chunk whose footer does not name a single source: it may hold any source
NUMBERS = (("bucket", np.int32), ("width", np.int32), ("height", np.int32), ("offset", np.int64), ("size", np.int32))


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
        self.root = upath(manifest)            # a local directory or a URL (s3://bucket/manifest)
        meta_path = layout.manifest_json(self.root)
        try:
            meta = open_meta(self.root)
        except ManifestMismatch as e:
            raise ManifestError(str(e)) from None
        self.meta = meta
        self.patch_size = meta.get("patch_size", paper.PATCH_SIZE)
        self._meta_path = meta_path
        self._buckets = None
        self.files = sample_parts(self.root, meta)   # the parts _manifest.json lists, no more, no fewer
        if not self.files:
            raise ManifestError(f"no samples/*.parquet under {self.root}: the manifest is empty or unfinished "
                                "(rerun `aimv2 shard`, it resumes)")
        file_idx, rg_idx, rows, srcs = self._read_footers()
        if not rows:
            raise ManifestError(f"{self.root}: the manifest has no samples")
        self.chunk_file = np.array(file_idx, dtype=np.int32)
        self.chunk_group = np.array(rg_idx, dtype=np.int32)
        self.chunk_rows = np.array(rows, dtype=np.int64)
        self.chunk_source = srcs                  # normalised name, "" (no source column) or ANY
        self.n = int(self.chunk_rows.sum())
        check_rows(self.root, meta, self.n)     # parts changed after the merge: refuse, say so
        self.has_source = any("source" in c for c in self.columns)
        self.sources = self._sources()
        h = hashlib.sha1(f"chunks:{self.n}".encode())
        for f, g, r in zip(self.chunk_file.tolist(), self.chunk_group.tolist(), rows):
            h.update(f"{self.files[f].name}:{g}:{r};".encode())
        self.fingerprint = h.hexdigest()[:16]

    def _read_footers(self):
        """Per chunk: file, row group, rows, source. Footers are small reads, latency-bound on network storage:
        a few threads read them (in file order). Each summary is folded in as it comes and dropped, the
        numbers go to compact arrays and a source name is one shared string: what is kept is O(chunks) small
        numbers, and no list of every part's summary builds up at start-up."""
        from concurrent.futures import ThreadPoolExecutor

        file_idx, rg_idx, rows, srcs = array("i"), array("i"), array("q"), []
        normalised: dict[str, str] = {}           # as spelled -> normalised (one object per name)
        schemas: dict[tuple, tuple] = {}
        self._spelled: dict[str, str] = {}
        self.columns: list[tuple[str, ...]] = []
        with ThreadPoolExecutor(max_workers=min(8, len(self.files))) as pool:
            for i, (f, (cols, groups)) in enumerate(zip(self.files, _in_order(pool, _named_footer, self.files))):
                missing = [c for c in REQUIRED if c not in cols]
                if missing:
                    raise ManifestError(f"{f}: missing columns {missing}; the loader needs {list(REQUIRED)} "
                                        "(manifests/SPEC.md); rebuild the manifest with `aimv2 shard`")
                self.columns.append(schemas.setdefault(tuple(cols), tuple(cols)))   # one copy per distinct schema
                for g, n, src in groups:
                    if n == 0:
                        continue
                    file_idx.append(i)
                    rg_idx.append(g)
                    rows.append(n)
                    if src not in ("", ANY):
                        norm = normalised.setdefault(src, norm_source(src))
                        self._spelled[norm] = src
                        src = norm
                    srcs.append(src)
        return file_idx, rg_idx, rows, srcs

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


def _in_order(pool, fn, items, ahead: int = 32):
    """fn over items, results in order, at most `ahead` in flight (`pool.map` submits every item at once:
    a future per part, ~2 KB each, alive until the whole pass ends)."""
    pending = deque()
    for x in items:
        pending.append(pool.submit(fn, x))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _parquet_source(path):
    """What pyarrow reads a part from: the local path, or a ranged-read file object at a URL."""
    return open_file(str(path)) if is_url(path) else str(path)


def _named_footer(path):
    """_footer with a damaged part named in one line (not a 40-line arrow traceback)."""
    try:
        return _footer(path)
    except Exception as e:  # noqa: BLE001 - arrow raises many kinds for damaged bytes
        raise damaged(path, e) from None


def _footer(path: Path) -> tuple[list[str], list[tuple[int, int, str | None]]]:
    """(column names, [(row group, rows, its single source: the spelled name, "" without a source column,
    ANY when the statistics do not name one)]) from a part's footer."""
    import pyarrow.parquet as pq

    md = pq.read_metadata(_parquet_source(path))
    names = [p.split(".")[0] for p in _leaf_paths(md)]
    j = names.index("source") if "source" in names else None
    groups = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        src = ""
        if j is not None:
            st = rg.column(j).statistics
            src = (st.min if st is not None and st.has_min_max and st.min == st.max and not st.null_count
                   else ANY)
        groups.append((g, rg.num_rows, src))
    return list(dict.fromkeys(names)), groups


_POOL_LOCK = threading.RLock()


@contextmanager
def _system_pool():
    """Arrow allocates from the C library's malloc while a share is read. Its default pool (mimalloc) kept
    ~35 MB resident after the first row groups, whatever the share's size, although at most ~6 MB were in
    use at once: a fixed cost on every rank's peak. With malloc, what arrow frees is reused by the numpy
    arrays the rows end in. The default pool is process-wide: put back on the way out, and one share is
    read at a time per process (two loaders in threads would otherwise restore each other's pools)."""
    import pyarrow as pa

    with _POOL_LOCK:
        old = pa.default_memory_pool()
        pa.set_memory_pool(pa.system_memory_pool())
        try:
            yield
        finally:
            pa.set_memory_pool(old)


def _leaf_paths(md) -> list[str]:
    """Leaf column paths of a footer, from its first row group's column chunks: `md.schema` and `md`
    reference each other, so each footer touched through it (~0.2 MB parsed) stays alive until the cyclic GC
    runs, which at 100 parts was ~18 MB of every rank's peak. A part without row groups has no chunks to ask."""
    if md.num_row_groups == 0:
        return list(md.schema.to_arrow_schema().names)
    rg = md.row_group(0)
    return [rg.column(j).path_in_schema for j in range(md.num_columns)]


class SampleTable:
    """Read-only view of the rows of some chunks (optionally only one source's). Rows are numbered in read
    order; `order` lists them in (shard, key) order and `members` per bucket in that order, which is all
    the sampler uses, so neither the order of a part's rows nor the split into parts changes a batch.
    `SampleTable(manifest)` reads every chunk; `chunks` is chunk ids (whole row groups) or spans, (k, 3)
    rows (chunk, start, stop): rows [start, stop) of the chunk's rows in (shard, key) order (shares.py).

    Memory (what a rank holds per row of its share): numbers ~34 B, key, caption and synthetic captions
    as UTF-8 bytes + int32 offsets (per chunk, never concatenated: no second copy while reading), a source
    code, 8 B of row order. Read chunk by chunk, so the peak is this plus one row group's Arrow table."""

    def __init__(self, manifest, chunks=None, source: str | None = None):
        m = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        self.manifest, self.root, self.meta = m, m.root, m.meta
        self.patch_size = m.patch_size
        chunks = np.arange(len(m.chunk_rows)) if chunks is None else np.asarray(chunks, dtype=np.int64)
        self.spans = (np.stack([chunks, 0 * chunks, m.chunk_rows[chunks]], axis=1) if chunks.ndim == 1
                      else chunks).reshape(-1, 3)
        self.chunks = np.unique(self.spans[:, 0])
        self.buckets = m.buckets
        # Numbers go straight into arrays sized for every row of the spans (untouched pages cost nothing):
        # no per-chunk pieces to concatenate, so no freed holes between the text arrays kept.
        cap = int((self.spans[:, 2] - self.spans[:, 1]).sum())
        num = {c: np.empty(cap, dt) for c, dt in
               NUMBERS + (("orientation", np.int8), ("is_jpeg", bool), ("shard", np.int32))}
        with _system_pool():
            starts, text, src_codes, shard_names, have_orient = self._read_chunks(m, self.spans, source, num)
        self.n = starts[-1]
        if self.n == 0 and source is None:
            raise ManifestError(f"{self.root}: the manifest has no samples")
        # views of the first n rows, no copies
        cat = {c: a[:self.n] for c, a in num.items()}
        self._set_numbers(cat, src_codes, have_orient)
        self._set_shards(cat["shard"], shard_names)
        self._check_tars(m)
        starts = np.array(starts, dtype=np.int64)
        self.syn_columns = sorted(c for c in text if c.startswith("syn_"))
        self.text = {c: Chunked(parts, starts) for c, parts in text.items()}
        self._set_order()

    def _set_numbers(self, cat: dict, src_codes: list, have_orient: bool):
        """The number columns as attributes, checked: positive sizes, buckets that _manifest.json defines."""
        self.bucket, self.width, self.height = cat["bucket"], cat["width"], cat["height"]
        self.offset, self.size, self.is_jpeg = cat["offset"], cat["size"], cat["is_jpeg"]
        self.orientation = cat["orientation"] if have_orient else None
        self.source = np.concatenate(src_codes) if src_codes else None
        if (self.width <= 0).any() or (self.height <= 0).any():
            raise ManifestError(f"{self.root}: samples with non-positive width/height "
                                f"({int(((self.width <= 0) | (self.height <= 0)).sum())} rows)")
        unknown = sorted(set(np.unique(self.bucket).tolist()) - set(self.buckets))
        if unknown:
            raise ManifestError(f"{self.root}: samples use buckets {unknown[:5]} that _manifest.json does not define")

    def _set_shards(self, shard_idx: np.ndarray, shard_names: dict[str, int]):
        """Shards in name order, so that shard index order is name order: renumbers `shard_idx` (read order
        codes) in place and resolves each shard's tar path."""
        names = sorted(shard_names)
        rank = np.empty(len(names), np.int32)
        for i, nm in enumerate(names):
            rank[shard_names[nm]] = i
        if self.n:
            shard_idx[:] = rank[shard_idx]
        self.shard_idx = shard_idx
        self.shard_names = names
        # what uid() hashes of each shard: its tar's folder and file name (computed once, not per sample)
        self._shard_where = ["/".join(nm.replace("\\", "/").rstrip("/").split("/")[-2:]) for nm in names]
        try:
            self.shards = [str(self._resolve(x)) for x in names]
        except StorageError as e:
            raise ManifestError(str(e)) from None

    def _check_tars(self, m: Manifest):
        """Tars moved or deleted since the build: all gone is a one-line error here (not 16 failed
        replacements deep in a step); some gone is what the loader's replacements are for, counted.
        At URLs a sample of the tars is asked for (a HEAD each), spread over the share."""
        local_tars = [s for s in self.shards if not is_url(s)]
        urls = [s for s in self.shards if is_url(s)]
        urls = urls[::max(1, -(-len(urls) // URL_CHECKS))][:URL_CHECKS]
        try:
            self.missing_shards = [s for s in local_tars if not os.path.exists(s)] + missing(urls)
        except StorageError as e:
            raise ManifestError(f"{m.root}: {e}") from None
        if self.shards and len(self.missing_shards) == len(local_tars) + len(urls):
            raise ManifestError(f"{m.root}: none of the {len(local_tars) + len(urls)} tars of this share "
                                f"{'checked ' if urls else ''}exists (e.g. {self.missing_shards[0]}); were they moved? "
                                "`shard` paths are relative to the manifest directory: move them back, or rebuild "
                                "the manifest with `aimv2 shard` over their new place")

    def _set_order(self):
        """Rows in (shard, key) order, not read order: img2dataset's download threads write a shard's samples
        in the order they finish, so two fetches of the same list give the same rows in another order.
        `members`: each bucket's rows, in that order."""
        self.order = self._sorted_order()
        by = np.argsort(self.bucket[self.order], kind="stable")
        ordered = self.order[by]
        ids, first = np.unique(self.bucket[ordered], return_index=True)
        ends = np.append(first[1:], len(ordered))
        self.members = {int(b): ordered[s:e] for b, s, e in zip(ids, first, ends)}

    def _read_chunks(self, m: Manifest, spans: np.ndarray, source: str | None, num: dict):
        """Row group by row group: numbers into `num`, text as per-chunk pieces; sets `source_names`."""
        pos = 0
        text: dict[str, list] = {}
        src_codes, self.source_names = [], []
        shard_names: dict[str, int] = {}
        have_orient = False
        starts = [0]
        for chunk, t in _row_groups(m, spans):
            if source is not None and "source" in t.column_names and m.chunk_source[chunk] is ANY:
                t = t.filter(_source_mask(t.column("source"), source))
            if t.num_rows == 0:
                continue
            t = t.combine_chunks()
            nulls = {c: t.column(c).null_count for c in REQUIRED if t.column(c).null_count}
            if nulls:
                raise ManifestError(f"{m.files[m.chunk_file[chunk]]}: null values in required columns {nulls}")
            for c, _ in NUMBERS:
                num[c][pos:pos + t.num_rows] = t.column(c).to_numpy()
            if "orientation" in t.column_names:
                have_orient = True
                num["orientation"][pos:pos + t.num_rows] = t.column("orientation").fill_null(1).to_numpy()
            else:
                num["orientation"][pos:pos + t.num_rows] = 1
            if "format" in t.column_names:
                fc = t.column("format").dictionary_encode().combine_chunks()
                jpeg = np.array([(x or "").lower() in ("jpeg", "jpg") for x in fc.dictionary.to_pylist()] + [False])
                num["is_jpeg"][pos:pos + t.num_rows] = jpeg[fc.indices.fill_null(-1).to_numpy()]
            else:
                num["is_jpeg"][pos:pos + t.num_rows] = True
            sh = t.column("shard").dictionary_encode().combine_chunks()
            remap = np.array([shard_names.setdefault(x, len(shard_names)) for x in sh.dictionary.to_pylist()],
                             dtype=np.int32)
            num["shard"][pos:pos + t.num_rows] = remap[sh.indices.to_numpy()]
            if "source" in t.column_names:
                sc = t.column("source").dictionary_encode().combine_chunks()
                names = sc.dictionary.to_pylist()
                for x in names:
                    if x not in self.source_names:
                        self.source_names.append(x)
                remap = np.array([self.source_names.index(x) for x in names], dtype=np.int16)
                idx = sc.indices.fill_null(-1).to_numpy().astype(np.int64)
                src_codes.append(np.where(idx >= 0, remap[idx.clip(0)] if len(remap) else -1, -1)
                                 .astype(np.int16))
            for c in ("key", "caption"):
                if c in t.column_names:
                    text.setdefault(c, []).append(Strings.from_arrow(t.column(c)))
            for c in t.column_names:
                if c.startswith("syn_"):
                    text.setdefault(c, []).append(StringLists.from_arrow(t.column(c), c))
            starts.append(starts[-1] + t.num_rows)
            pos += t.num_rows
            del t
        return starts, text, src_codes, shard_names, have_orient

    def _sorted_order(self) -> np.ndarray:
        """Row ids in (shard, key) order (keys compared as UTF-8 bytes), in numpy: keys as fixed-width bytes."""
        if self.n == 0:
            return np.zeros(0, np.int32)
        pieces = []
        for p in self.text["key"].parts:
            off = p.offsets.astype(np.int64)
            lens = np.diff(off)
            width = max(1, int(lens.max()))
            pos = off[:-1, None] + np.arange(width)
            mat = np.where(np.arange(width) < lens[:, None], p.data[np.minimum(pos, max(0, len(p.data) - 1))], 0)
            pieces.append(mat.astype(np.uint8))
        width = max(x.shape[1] for x in pieces)
        keys = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1]))) for x in pieces])
        keys = np.ascontiguousarray(keys).view(f"S{width}").ravel()
        return np.lexsort((keys, self.shard_idx)).astype(np.int32)

    def _resolve(self, shard: str) -> str:
        # manifests/SPEC.md: a URL or an absolute path as is, else relative to the manifest directory
        return resolve_against(self.root, shard)

    def key(self, row: int) -> str:
        return self.text["key"][row]

    def uid(self, row: int) -> int:
        """A stable 63-bit id of the sample (its tar's folder and file name, and its key): keys its crop and
        caption draws, so they depend neither on which rank reads it, nor where it sits in the manifest, nor
        where the tars are stored (a relative path, an absolute one or an s3:// URL give the same draws)."""
        d = hashlib.blake2b(f"{self._shard_where[self.shard_idx[row]]}\0{self.key(row)}".encode(), digest_size=8)
        return int.from_bytes(d.digest(), "little") >> 1

    def texts(self, row: int) -> dict:
        """source, caption and synthetic captions of one row (None where absent)."""
        out = {c: col[row] for c, col in self.text.items()}
        if self.source is not None:
            code = int(self.source[row])
            out["source"] = self.source_names[code] if code >= 0 else None
        return out


def _row_groups(m: Manifest, spans: np.ndarray):
    """(chunk, Arrow table) per chunk of `spans`, in chunk order: the whole row group, or its spans' rows
    in (shard, key) order (the order a share's deal counts in, whatever order the rows were written in)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    pf, open_f = None, None
    for c in np.unique(spans[:, 0]).tolist():
        f, g, n = int(m.chunk_file[c]), int(m.chunk_group[c]), int(m.chunk_rows[c])
        if f != open_f:
            want = [x for x in m.columns[f] if x in REQUIRED or x in OPTIONAL_TEXT or x in ("format", "orientation")
                    or x.startswith("syn_")]
            pf, open_f = pq.ParquetFile(_parquet_source(m.files[f])), f
        t = pf.read_row_group(g, columns=want, use_threads=False)
        mine = spans[spans[:, 0] == c]
        if len(mine) != 1 or mine[0, 1] != 0 or mine[0, 2] != n:
            t = t.take(pc.sort_indices(t, sort_keys=[("shard", "ascending"), ("key", "ascending")]))
            t = pa.concat_tables([t.slice(int(a), int(b - a)) for _, a, b in sorted(mine.tolist())])
        yield c, t


class Chunked:
    """A text column kept as its per-chunk pieces (no concatenated copy): row -> (piece, row in piece)."""

    def __init__(self, parts: list, starts: np.ndarray):
        self.parts, self.starts = parts, starts

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k][int(i - self.starts[k])]


def _source_mask(col, source: str):
    """Arrow mask of the rows whose source normalises to `source` (nulls: the unnamed source "")."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keep = [n for n in pc.unique(col).to_pylist() if n is not None and norm_source(n) == source]
    return pc.is_in(col, value_set=pa.array(keep, type=col.type)).fill_null(source == "")


class Strings:
    """A string column as offsets (int64, n+1) + UTF-8 bytes + a null mask: pure numpy."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray, null: np.ndarray):
        self.offsets, self.data, self.null = offsets, data, null

    @classmethod
    def from_arrow(cls, arr) -> "Strings":
        import pyarrow as pa

        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            arr = arr.cast(pa.string())
        _, off, data = arr.buffers()
        dt = np.int64 if pa.types.is_large_string(arr.type) else np.int32
        offsets = np.frombuffer(off, dtype=dt)[arr.offset:arr.offset + len(arr) + 1].copy()
        data = np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]].copy() if data is not None else \
            np.zeros(0, np.uint8)
        offsets -= offsets[0]
        null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
        return cls(offsets, data, null)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str | None:
        if self.null is not None and self.null[i]:
            return None
        return self.data[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")


class StringLists:
    """A list[str] column: list offsets over a `Strings` of all entries."""

    def __init__(self, offsets: np.ndarray, values: Strings, null: np.ndarray):
        self.offsets, self.values, self.null = offsets, values, null

    @classmethod
    def from_arrow(cls, arr, name: str = "") -> "StringLists":
        import pyarrow as pa

        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
            raise ManifestError(f"column {name} must be list[str] (synthetic captions), got {arr.type}")
        offsets = arr.offsets.to_numpy().astype(np.int32 if pa.types.is_list(arr.type) else np.int64)
        values = Strings.from_arrow(arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])))
        offsets = offsets - offsets[0]
        null = arr.is_null().to_numpy(zero_copy_only=False) if arr.null_count else None
        return cls(offsets, values, null)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[str] | None:
        if self.null is not None and self.null[i]:
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
