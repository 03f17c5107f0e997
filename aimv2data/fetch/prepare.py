"""The url lists -> DIR/_input/part-NNNNN.parquet (what img2dataset reads) and the job file. Every check that
can fail runs before DIR is created or changed."""
from __future__ import annotations

import io
from pathlib import Path

from aimv2data import storage
from aimv2data.fetch.errors import FetchError
from aimv2data.fetch.input import check_columns, expand_url_lists, load_dfn_index, normalise, source_spec
from aimv2data.fetch.options import FetchOptions
from aimv2data.fetch.output import INPUT_DIR, JOB_FORMAT, write_if_changed, write_job


def _fingerprint(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        size, version = storage.stat(p)     # mtime locally, ETag for an object
        out.append([str(p) if storage.is_url(p) else str(p.resolve()), size, version])
    return out


def _read_lists(opts: FetchOptions):
    """The url list files, their columns, and the DFN index: the input checks, before any row is read."""
    spec = source_spec(opts.source, opts.url_col, opts.caption_col)
    files = expand_url_lists(opts.url_lists)
    names = {f: check_columns(f, spec, opts.source) for f in files}
    index = load_dfn_index(opts.dfn_index) if opts.source == "dfn" else None
    if opts.verify_hash is None:
        opts.verify_hash = opts.source == "dfn" and all("sha256" in n for n in names.values())
    elif opts.verify_hash and not all("sha256" in n for n in names.values()):
        raise FetchError("--verify-hash: the url list has no sha256 column", "verify-hash")
    return spec, files, names, index


def prepare(opts: FetchOptions, out, job: dict | None, lock=lambda: None) -> dict:
    """Validate the inputs, then write (or reuse) DIR/_input/part-NNNNN.parquet and the job file.
    `lock()` is called just before the first write."""
    spec, files, names, index = _read_lists(opts)
    settings = opts.settings()
    fingerprint = _fingerprint(files + ([Path(opts.dfn_index)] if opts.dfn_index else []))
    if job is not None:
        diff = opts.differences(job["settings"])
        if diff:
            raise FetchError(f"output directory {out} holds a fetch made with other settings ({'; '.join(diff)}); "
                             "rerun with the same flags to resume, or use a new --output", "output")
        if job.get("prepared") and job.get("fingerprint") == fingerprint:
            return job  # same files, untouched since: reuse the prepared parts

    frames, counts, left = [], [], opts.limit
    for f in files:
        df, c = normalise(f, opts.source, spec, names[f], index)
        if left is not None:
            df = df.head(left)
            left -= df.height
        c["kept"] = df.height
        frames.append(df)
        counts.append(c)

    inp = out / INPUT_DIR
    parts = [{"name": f"part-{i:05d}.parquet", "rows": df.height, "source_file": str(f)}
             for i, (f, df) in enumerate(zip(files, frames)) if df.height]
    kept_frames = [df for df in frames if df.height]
    total = {k: sum(c.get(k, 0) for c in counts) for k in ("rows", "no_url", "bad_uid", "not_in_index", "kept")}
    total["files"] = len(files)
    if not parts:
        raise FetchError(f"nothing to fetch: 0 of {total['rows']} rows left after filtering ({total})", "url-list")

    if job is not None and job.get("prepared"):
        # Files changed on disk since the job was prepared: fine if the rows are the same.
        same = [p["name"] for p in job["parts"]] == [p["name"] for p in parts] and all(
            storage.read_parquet(inp / p["name"]).equals(df) for p, df in zip(parts, kept_frames))
        if not same:
            raise FetchError(f"output directory {out} holds a fetch of other url lists (the rows differ); "
                             "use a new --output for a new list", "url-list")
        return job

    lock()
    inp.mkdir(parents=True, exist_ok=True)
    new_job = {"format": JOB_FORMAT, "settings": settings, "prepared": False}
    write_job(out, new_job)  # marks DIR as ours before anything else lands
    for old in inp.glob("part-*.parquet"):
        old.unlink()
    for p, df in zip(parts, kept_frames):
        buf = io.BytesIO()
        df.write_parquet(buf)
        write_if_changed(inp / p["name"], buf.getvalue())
    new_job.update(prepared=True, fingerprint=fingerprint, parts=parts, input=total,
                   columns=list(kept_frames[0].columns),
                   dfn_index=str(Path(opts.dfn_index).resolve()) if opts.dfn_index else None)
    write_job(out, new_job)
    return new_job
