"""Url lists -> the normalised parquet parts img2dataset reads (polars). Everything that can be wrong
with the input is found here, before the output directory is touched or anything is downloaded.

Sources:
  coyo     COYO-700M parquet: id, url, text (+ width, height kept as src_width/src_height)
  dfn      DataComp pool parquet: uid, url, text (+ original_width/original_height, sha256), kept only
           where the uid is in the DFN index (--dfn-index FILE.npy)
  parquet  any parquet: --url-col, --caption-col

The DFN index is a sorted .npy of dtype [('f0','<u8'),('f1','<u8')]: each 32-hex uid as two 64-bit
halves, high half first. Membership is a binary search (np.searchsorted) on the memory-mapped index,
so a 2-billion-entry index (32 GB) is never read into memory.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from aimv2data.fetch.errors import FetchError
from aimv2data.urls import USERINFO

INDEX_DTYPE = np.dtype([("f0", "<u8"), ("f1", "<u8")])


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    required: dict[str, str]   # input column -> normalised column
    optional: dict[str, str]   # kept when present, null-filled when absent (fixed schema across parts)
    dtypes: dict[str, str]     # normalised column -> polars dtype name


SOURCES = {
    "coyo": SourceSpec(
        required={"id": "id", "url": "url", "text": "caption"},
        optional={"width": "src_width", "height": "src_height"},
        dtypes={"id": "Int64", "url": "String", "caption": "String", "src_width": "Int64", "src_height": "Int64"},
    ),
    "dfn": SourceSpec(
        required={"uid": "uid", "url": "url", "text": "caption"},
        optional={"original_width": "src_width", "original_height": "src_height", "sha256": "src_sha256"},
        dtypes={"uid": "String", "url": "String", "caption": "String", "src_width": "Int64",
                "src_height": "Int64", "src_sha256": "String"},
    ),
}


def source_spec(source: str, url_col: str = "url", caption_col: str | None = "caption") -> SourceSpec:
    if source in SOURCES:
        return SOURCES[source]
    if source == "parquet":
        required = {url_col: "url"}
        dtypes = {"url": "String"}
        if caption_col:
            required[caption_col] = "caption"
            dtypes["caption"] = "String"
        return SourceSpec(required=required, optional={}, dtypes=dtypes)
    raise FetchError(f"unknown source {source!r}: use coyo, dfn or parquet", "source")


def expand_url_lists(paths: list[str | Path]) -> list[Path]:
    """Files as given; directories expand to their *.parquet, sorted. Missing paths are errors. Local
    paths or URLs (s3://bucket/lists/)."""
    from aimv2data import storage

    if not paths:
        raise FetchError("no url list given: pass --url-list PATH (a parquet file or a directory of them)", "url-list")
    out: list[Path] = []
    for given in paths:
        try:
            p = storage.upath(given)
            if storage.is_url(given):
                storage.check_reachable(str(given))
        except storage.StorageError as e:
            raise FetchError(str(e), "url-list") from None
        if p.is_dir():
            found = sorted(p.glob("*.parquet"))
            if not found:
                raise FetchError(f"url list directory {p} holds no *.parquet files", "url-list")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FetchError(f"url list {p} does not exist", "url-list")
    return out


def check_columns(path: Path, spec: SourceSpec, source: str) -> list[str]:
    """Read only the schema; name every missing column and list those present."""

    from aimv2data.storage import parquet_columns

    try:
        names = parquet_columns(path)
    except Exception as e:
        raise FetchError(f"cannot read url list {path} as parquet ({type(e).__name__}: {e}). "
                         "Url lists must be parquet files.", "url-list") from e
    missing = [c for c in spec.required if c not in names]
    if missing:
        hint = " (use --url-col/--caption-col to name yours)" if source == "parquet" else \
            " (for another layout use --source parquet --url-col ... --caption-col ...)"
        raise FetchError(f"url list {path} has no column {', '.join(map(repr, missing))} needed by --source "
                         f"{source}; columns present: {', '.join(names)}{hint}", "url-list")
    return names


# -- DFN index ---------------------------------------------------------------------------------
def load_dfn_index(path: str | Path) -> np.ndarray:
    """Memory-map and validate a DFN uid index. Checks the dtype exactly and that it is sorted
    (on up to 1M evenly spaced entries plus the first 64k: cheap even for 2B entries)."""
    p = Path(path)
    if not p.is_file():
        raise FetchError(f"DFN index {p} does not exist", "dfn-index")
    try:
        idx = np.load(p, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise FetchError(f"cannot read DFN index {p} as a .npy array ({type(e).__name__}: {e})", "dfn-index") from e
    if idx.dtype != INDEX_DTYPE or idx.ndim != 1:
        raise FetchError(
            f"DFN index {p} has dtype {idx.dtype} and shape {idx.shape}; expected a 1-d array of dtype "
            "[('f0', '<u8'), ('f1', '<u8')] (np.dtype('u8,u8')): each 32-hex uid split into two 64-bit "
            "halves, high half first, sorted. Convert uids with aimv2data.fetch.uid_pairs().", "dfn-index")
    n = len(idx)
    spread = np.linspace(0, n - 1, min(n, 1_000_000)).astype(np.int64)
    sample = np.unique(np.concatenate([np.arange(min(n, 65536)), spread])) if n else []
    s = np.asarray(idx[sample])
    hi, lo = s["f0"], s["f1"]
    if len(s) > 1 and not np.all((hi[:-1] < hi[1:]) | ((hi[:-1] == hi[1:]) & (lo[:-1] <= lo[1:]))):
        raise FetchError(f"DFN index {p} is not sorted; sort it with np.sort(index) (order f0, then f1)", "dfn-index")
    return idx


def uid_pairs(uids) -> np.ndarray:
    """32-hex uid strings -> records of INDEX_DTYPE (high half in f0). Vectorised: one bytes.fromhex."""
    uids = list(uids)
    rec = np.empty(len(uids), dtype=INDEX_DTYPE)
    if uids:
        halves = np.frombuffer(bytes.fromhex("".join(uids)), dtype=">u8").reshape(-1, 2)
        rec["f0"], rec["f1"] = halves[:, 0], halves[:, 1]
    return rec


def in_index(index: np.ndarray, uids) -> np.ndarray:
    """Boolean mask: which uids are in the sorted index."""
    q = uid_pairs(uids)
    if len(index) == 0 or len(q) == 0:
        return np.zeros(len(q), dtype=bool)
    pos = np.searchsorted(index, q)
    found = np.asarray(index[np.minimum(pos, len(index) - 1)])
    return (pos < len(index)) & (found == q)


# -- normalising -------------------------------------------------------------------------------
def normalise(path: Path, source: str, spec: SourceSpec, names: list[str], index: np.ndarray | None):
    """One url list -> (normalised polars frame, counts). Rows without a url are dropped and
    counted; for dfn, rows with a malformed uid are dropped and counted, then the index applied."""
    import polars as pl

    from aimv2data.storage import read_parquet

    cols = {**spec.required, **{k: v for k, v in spec.optional.items() if k in names}}
    try:
        df = read_parquet(path, columns=list(cols))
    except Exception as e:
        raise FetchError(f"cannot read url list {path} ({type(e).__name__}: {e})", "url-list") from e
    df = df.rename(cols)
    counts = {"rows": df.height}
    exprs = []
    for name, dtype in spec.dtypes.items():
        target = getattr(pl, dtype)
        if name in df.columns:
            exprs.append(pl.col(name).cast(target, strict=False))
        else:
            exprs.append(pl.lit(None, dtype=target).alias(name))
    df = df.select(exprs)
    # credentials inside a url are never sent nor stored (aimv2data/urls.py)
    df = df.with_columns(pl.col("url").str.strip_chars().str.replace(USERINFO, "${1}"))
    keep = pl.col("url").is_not_null() & (pl.col("url") != "")
    counts["no_url"] = df.height - df.filter(keep).height
    df = df.filter(keep)
    if source == "dfn":
        df = df.with_columns(pl.col("uid").str.to_lowercase())
        ok = pl.col("uid").str.contains(r"^[0-9a-f]{32}$").fill_null(False)
        counts["bad_uid"] = df.height - df.filter(ok).height
        df = df.filter(ok)
        mask = in_index(index, df["uid"].to_list())
        counts["not_in_index"] = int((~mask).sum())
        df = df.filter(pl.Series(mask))
    df = df.with_columns(pl.lit(source).alias("source"))
    counts["kept"] = df.height
    return df, counts


def additional_columns(source: str, spec: SourceSpec, verify_hash: bool) -> list[str]:
    """Columns img2dataset copies into each sample's json (besides url, caption and its own)."""
    cols = [c for c in spec.dtypes if c not in ("url", "caption")] + ["source"]
    if verify_hash:
        cols.remove("src_sha256")  # img2dataset reads it as the hash to verify instead
    return cols
