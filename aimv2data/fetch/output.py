"""The output directory: its one writer, the job file that marks it ours, its shard names, and what an
interrupted run left in it. Every path fetch writes in DIR is named here."""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

from aimv2data import storage
from aimv2data.fetch.errors import FetchError
from aimv2data.fetch.summary import RECORD_COLUMNS, read_stats
from aimv2data.manifest.lock import LOCK_NAME, LockHeld, output_lock

JOB_FORMAT = "aimv2-fetch-job/1"
INPUT_DIR = "_input"                       # the url list parts img2dataset reads, the job file, retry rounds
JOB_NAME = "fetch_job.json"
LOG_NAME = "_logs/img2dataset.log"         # img2dataset's own output (its workers' lines, its tqdm)


def job_path(out) -> Path:
    return out / INPUT_DIR / JOB_NAME


def log_path(out) -> Path:
    return out / LOG_NAME


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write all-or-nothing (storage.write_bytes: temp + rename locally, one PUT at a URL); leave the file
    alone (mtime too) when unchanged."""
    if path.is_file() and path.read_bytes() == data:
        return False
    storage.write_bytes(path, data)
    return True


def write_job(out, job: dict) -> bool:
    return write_if_changed(job_path(out), json_bytes(job))


def read_job(out) -> dict | None:
    try:
        job = json.loads(job_path(out).read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) and job.get("format") == JOB_FORMAT else None


def check_output(out) -> dict | None:
    """The job already in DIR (None when DIR is new or empty). Refuses anything else, untouched."""
    if out.exists() and not out.is_dir():
        raise FetchError(f"output {out} is a file, not a directory", "output")
    entries = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.exists() else []
    if not entries:
        return None
    job = read_job(out)
    if job is None:
        shown = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "")
        raise FetchError(f"output directory {out} is not empty and is not an aimv2 fetch output "
                         f"(it holds: {shown}); choose an empty or new directory", "output")
    return job


@contextlib.contextmanager
def output_locked(out):
    """One fetch per output directory. Yields `lock()`, which takes DIR's lock (once; a FetchError naming the
    holder when another run has it): called just before the first write, so input refused before that leaves
    a new DIR uncreated. A URL output is not locked (object stores have no flock)."""
    with contextlib.ExitStack() as stack:
        held = []

        def lock():
            if held or storage.is_url(out):
                return
            try:
                stack.enter_context(output_lock(out, tool="aimv2 fetch"))
            except LockHeld as e:
                raise FetchError(str(e)) from None
            held.append(out)

        yield lock


def output_path(output: str):
    """The output as a Path, or a UPath for a URL, after checking the bucket exists and the credentials
    work (a one-line FetchError before anything is written)."""
    try:
        storage.check_reachable(str(output), for_writing=True)
        return storage.upath(output)
    except storage.StorageError as e:
        raise FetchError(str(e), "output") from None


# -- shards ------------------------------------------------------------------------------------
def name_width(n_shards: int) -> int:
    """img2dataset's shard names are zero-padded to this many digits (its `oom_shard_count`)."""
    return max(5, len(str(max(n_shards - 1, 0))))


def shard_count(job: dict, shard_size: int) -> int:
    """img2dataset numbers shards consecutively across its input files in name order."""
    return sum(math.ceil(p["rows"] / shard_size) for p in job["parts"])


def shard_names(job: dict, shard_size: int) -> list[str]:
    n = shard_count(job, shard_size)
    return [f"{i:0{name_width(n)}d}" for i in range(n)]


def shard_done(out, name: str) -> bool:
    """Its stats parse, its tar exists, and its parquet reads with one row per attempted sample: two writers
    (or a damaged disk) can leave a broken parquet behind a complete-looking tar, which the summary reads."""
    stats = read_stats(out / f"{name}_stats.json")
    if stats is None or not (out / f"{name}.tar").is_file():
        return False
    try:
        rows = storage.read_parquet(out / f"{name}.parquet", columns=list(RECORD_COLUMNS)).height
    except Exception:  # pyarrow/polars raise many kinds (ComputeError, OSError, ArrowInvalid) for a bad file
        return False
    return rows == int(stats["count"])


def sweep(out, names: list[str]) -> list[str]:
    """Delete what an interrupted run left behind; return the shards still to fetch."""
    pending = []
    for n in names:
        if shard_done(out, n):
            continue
        pending.append(n)
        for f in (out / f"{n}.tar", out / f"{n}.parquet", out / f"{n}_stats.json"):
            f.unlink(missing_ok=True)
    _remove_tree(out / "_tmp")  # img2dataset's feather scratch files
    return pending


def _remove_tree(path) -> None:
    if not storage.is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = storage.filesystem(str(path))
    try:
        fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass
