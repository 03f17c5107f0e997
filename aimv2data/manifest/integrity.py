"""Reader-side checks of a manifest: the sample parts on disk are the ones `_manifest.json` lists, and
every part read names itself when it is damaged. Used by the loader, `stats`, `split` and the tokenizer, so no
reader trains on a manifest whose parts disagree with its own summary (e.g. a refused re-shard that left
a second copy of every sample) or dies in a 40-line polars traceback that names no file.

Only the manifest contract (manifests/SPEC.md) is used: `_manifest.json` `parts` (written since this
check exists) and `counts.samples`.
"""
from __future__ import annotations

import json
from pathlib import Path

from aimv2data import storage
from aimv2data.manifest import layout
from aimv2data.manifest.schema import SCHEMA_VERSION

SCHEMA_MAJOR = SCHEMA_VERSION.split(".")[0]


class ManifestMismatch(ValueError):
    """The samples/ parts disagree with _manifest.json, or a part or _manifest.json cannot be read."""


def open_meta(root, required: bool = True) -> dict | None:
    """A reader's MANIFEST/_manifest.json, parsed and checked: missing (unless not `required`: None), damaged
    or foreign is a one-line ManifestMismatch naming it, and at a URL a store that does not answer says so
    (not "not found")."""
    meta_path = layout.manifest_json(root)
    try:
        found = storage.is_file(meta_path)
    except storage.StorageError as e:
        raise ManifestMismatch(str(e)) from None
    if not found and not required:
        return None
    if not found:
        raise ManifestMismatch(f"{meta_path} not found: pass a manifest directory written by `aimv2 shard`")
    return read_meta(meta_path)


def read_meta(meta_path) -> dict:
    """_manifest.json parsed and checked (check_meta): a damaged or foreign one is a one-line error naming it."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestMismatch(f"{meta_path} is not valid JSON ({str(e)[:120]}): the manifest's summary is "
                               "damaged; move it away and rewrite it with `aimv2 shard --merge-only MANIFEST`") from None
    check_meta(meta, meta_path)
    return meta


def check_meta(meta, where) -> None:
    """What a reader relies on in _manifest.json: a known major schema_version (manifests/SPEC.md: refuse an
    unknown one), a positive integer patch_size, `parts` a list of names and `counts` an object."""
    if not isinstance(meta, dict):
        raise ManifestMismatch(f"{where}: expected a JSON object, got {type(meta).__name__}; rebuild it with "
                               "`aimv2 shard --merge-only MANIFEST`")
    version = meta.get("schema_version")
    # a hand-written manifest may say 1 or 1.0 as a number: the major is what matters
    known = isinstance(version, (str, int, float)) and not isinstance(version, bool)
    if version is not None and (not known or str(version).split(".")[0] != SCHEMA_MAJOR):
        raise ManifestMismatch(f"{where}: schema_version {version!r} is not one this aimv2 reads (major "
                               f"{SCHEMA_MAJOR}, manifests/SPEC.md); use the aimv2 that wrote it, or rebuild the "
                               "manifest with `aimv2 shard`")
    bad = _bad_field(meta)
    if bad:
        raise ManifestMismatch(f"{where}: {bad}; rebuild the manifest with `aimv2 shard` (or fix the key by hand)")


def _bad_field(meta: dict) -> str | None:
    ps = meta.get("patch_size")
    if ps is not None and (type(ps) is not int or ps < 1):
        return f"patch_size must be a positive integer, got {ps!r}"
    parts = meta.get("parts")
    if parts is not None and not (isinstance(parts, list) and all(isinstance(x, str) for x in parts)):
        return "parts must be a list of file names"
    counts = meta.get("counts")
    if counts is not None and not isinstance(counts, dict):
        return f"counts must be an object, got {type(counts).__name__}"
    want = (counts or {}).get("samples")
    if want is not None and (type(want) is not int or want < 0):
        return f"counts.samples must be a non-negative integer, got {want!r}"
    return None


def sample_parts(root: str | Path, meta: dict) -> list[Path]:
    """samples/*.parquet of the manifest at `root`, checked against `meta` (its _manifest.json): a part
    on disk that the manifest does not list, or one it lists that is missing, is an error naming them."""
    files = layout.sample_files(root)
    listed = meta.get("parts")
    if listed is None:   # a manifest from before the list: only the row count can be compared (count_rows)
        return files
    on_disk = {f.name for f in files}
    extra, missing = sorted(on_disk - set(listed)), sorted(set(listed) - on_disk)
    if extra or missing:
        what = "; ".join(x for x in (
            f"{len(extra)} part(s) not in _manifest.json (e.g. samples/{extra[0]})" if extra else "",
            f"{len(missing)} listed part(s) missing (e.g. samples/{missing[0]})" if missing else "") if x)
        raise ManifestMismatch(f"{root}: samples/ disagrees with _manifest.json: {what}; rerun `aimv2 shard` with "
                               "the manifest's inputs (it refuses strays and says which), or remove the stray parts")
    return files


def check_rows(root: str | Path, meta: dict, rows: int) -> None:
    """The rows read must be the `counts.samples` the manifest was merged with."""
    want = (meta.get("counts") or {}).get("samples")
    if want is not None and rows != want:
        raise ManifestMismatch(f"{root}: samples/*.parquet hold {rows} rows, _manifest.json counts {want}: the parts "
                               "changed after the merge; rerun `aimv2 shard` with the manifest's inputs")


def damaged(path, e: BaseException) -> ManifestMismatch:
    """The one-line error for a part that cannot be read (not a 40-line arrow traceback); raise it `from None`."""
    return ManifestMismatch(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}): the "
                            "part is damaged; rerun `aimv2 shard` with the same inputs, it redoes damaged parts")


def read_part(path: str | Path, columns=None):
    """pl.read_parquet of one part; a damaged file is a one-line error naming it."""

    try:
        return storage.read_parquet(path, columns=columns)
    except Exception as e:  # noqa: BLE001 - polars/arrow raise many kinds for damaged bytes
        raise damaged(path, e) from None


def read_schema(path: str | Path) -> dict:
    import polars as pl

    try:
        if storage.is_url(path):
            with storage.open_file(str(path)) as f:
                return dict(pl.read_parquet(f, n_rows=0).schema)
        return dict(pl.read_parquet_schema(path))
    except Exception as e:  # noqa: BLE001
        raise damaged(path, e) from None
