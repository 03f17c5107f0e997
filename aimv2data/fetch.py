"""`aimv2 fetch`: url lists -> webdataset shards at native resolution, by img2dataset.

    summary = fetch(FetchOptions(source="coyo", url_lists=["coyo.parquet"], output="shards/"))

Output layout (img2dataset's own, plus two things of ours):
    DIR/NNNNN.tar              KEY.jpg, KEY.txt (caption), KEY.json (img2dataset's sample json + our columns)
    DIR/NNNNN.parquet          one row per attempted sample: key, url, status, error_message, sizes, ...
    DIR/NNNNN_stats.json       written by img2dataset after the tar is closed: the shard is complete
    DIR/fetch_summary.json     written when a run ends (absent while a run is in progress)
    DIR/_input/                the normalised url list parts img2dataset reads + fetch_job.json

One writer: a run holds DIR/.lock (aimv2 shard's flock lock, aimv2data/manifest/lock.py) from its first
write to its end; a second run into DIR is refused, naming the holder. Not for a URL output (no flock).

Resume: a shard is done when its _stats.json parses, its tar exists and its parquet reads with one row per
attempted sample (a broken parquet behind a complete-looking tar is redone). Before downloading, shards
that are not done lose their partial tar/parquet (img2dataset would overwrite them anyway, but a
crash must never leave a partial tar that a reader could mistake for data), then img2dataset's
incremental mode skips the done ones. A rerun of a finished job reads nothing from the network and
writes nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from pathlib import Path

# img2dataset imports albumentations, which otherwise checks PyPI for a newer version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from aimv2data import fetch_summary, storage  # noqa: E402
from aimv2data.fetch_input import (FetchError, additional_columns, check_columns,  # noqa: E402
                                   expand_url_lists, load_dfn_index, normalise, source_spec)
from aimv2data.fetch_resize import DEFAULT_MAX_PIXELS  # noqa: E402
from aimv2data.manifest.lock import LOCK_NAME, LockHeld, output_lock  # noqa: E402

JOB_FORMAT = "aimv2-fetch-job/1"
INPUT_DIR = "_input"
JOB_NAME = "fetch_job.json"
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


class FetchIncomplete(Exception):
    """The run ended with shards missing (interrupted, or shards that failed twice): rerun to resume."""

    def __init__(self, message: str, summary: dict | None, signal_number: int | None = None):
        super().__init__(message)
        self.summary, self.signal_number = summary, signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number if self.signal_number else 1


@dataclasses.dataclass
class FetchOptions:
    source: str                            # coyo | dfn | parquet
    url_lists: list[str]                   # parquet files or directories of them
    output: str
    dfn_index: str | None = None           # dfn: sorted u8,u8 uid index (.npy)
    url_col: str = "url"                   # parquet source only
    caption_col: str | None = "caption"    # parquet source only; None: no captions
    processes: int = max(1, os.cpu_count() or 1)
    threads: int = 64
    shard_size: int = 10_000
    limit: int | None = None               # first N rows after filtering
    max_side: int = 2048                   # downscale when the long side is larger; 0: never
    max_pixels: int = DEFAULT_MAX_PIXELS   # refuse larger images before decoding
    distributor: str = "multiprocessing"
    timeout: int = 10
    retries: int = 0
    verify_hash: bool | None = None        # None: on for dfn (the pool's sha256), off otherwise
    keep_progressive: bool = False
    quality: int = 95
    retry_failed: bool = False             # download again only what failed transiently (fetch_retry)
    ray_address: str | None = None         # --distributor ray: the cluster (default: what ray.init finds)
    allow_private_addresses: bool = False  # fetch from private/loopback addresses too (fetch_guard.py)

    def settings(self) -> dict:
        """What defines the output: a rerun with different settings is refused, not mixed in."""
        return {
            "source": self.source, "url_col": self.url_col if self.source == "parquet" else None,
            "caption_col": self.caption_col if self.source == "parquet" else None,
            "shard_size": self.shard_size, "limit": self.limit, "max_side": self.max_side,
            "max_pixels": self.max_pixels, "verify_hash": bool(self.verify_hash),
            "keep_progressive": self.keep_progressive, "quality": self.quality,
        }


# -- small helpers -----------------------------------------------------------------------------
def write_if_changed(path: Path, data: bytes) -> bool:
    """Write all-or-nothing (storage.write_bytes: temp + rename locally, one PUT at a URL); leave the file
    alone (mtime too) when unchanged."""
    if path.is_file() and path.read_bytes() == data:
        return False
    storage.write_bytes(path, data)
    return True


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def _fingerprint(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        size, version = storage.stat(p)     # mtime locally, ETag for an object
        out.append([str(p) if storage.is_url(p) else str(p.resolve()), size, version])
    return out


def shard_names(parts: list[dict], shard_size: int) -> list[str]:
    """img2dataset numbers shards consecutively across its input files in name order."""
    n = sum(math.ceil(p["rows"] / shard_size) for p in parts)
    width = max(5, len(str(max(n - 1, 0))))
    return [f"{i:0{width}d}" for i in range(n)]


# -- the output directory ----------------------------------------------------------------------
def read_job(out: Path) -> dict | None:
    try:
        job = json.loads((out / INPUT_DIR / JOB_NAME).read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) and job.get("format") == JOB_FORMAT else None


def check_output(out: Path) -> dict | None:
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


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# -- input preparation -------------------------------------------------------------------------
def prepare(opts: FetchOptions, out: Path, job: dict | None, lock=lambda: None) -> dict:
    """Validate the inputs, then write (or reuse) DIR/_input/part-NNNNN.parquet and the job file.
    Every check that can fail runs before DIR is created or changed (and `lock()` is called)."""

    if opts.source not in ("coyo", "dfn", "parquet"):
        raise FetchError(f"unknown source {opts.source!r}: use coyo, dfn or parquet", "source")
    spec = source_spec(opts.source, opts.url_col, opts.caption_col)
    files = expand_url_lists(opts.url_lists)
    names = {f: check_columns(f, spec, opts.source) for f in files}
    index = None
    if opts.source == "dfn":
        if not opts.dfn_index:
            raise FetchError("--source dfn needs --dfn-index FILE.npy (the DFN uid index)", "dfn-index")
        index = load_dfn_index(opts.dfn_index)
    elif opts.dfn_index:
        raise FetchError("--dfn-index applies to --source dfn only", "dfn-index")
    if opts.verify_hash and opts.source != "dfn":
        raise FetchError("--verify-hash needs --source dfn (the pool's sha256 column)", "verify-hash")
    if opts.verify_hash is None:
        opts.verify_hash = opts.source == "dfn" and all("sha256" in n for n in names.values())
    elif opts.verify_hash and not all("sha256" in n for n in names.values()):
        raise FetchError("--verify-hash: the url list has no sha256 column", "verify-hash")

    settings = opts.settings()
    fingerprint = _fingerprint(files + ([Path(opts.dfn_index)] if opts.dfn_index else []))
    if job is not None:
        diff = _differences(settings, job["settings"])
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
    write_if_changed(inp / JOB_NAME, _json_bytes(new_job))  # marks DIR as ours before anything else lands
    for old in inp.glob("part-*.parquet"):
        old.unlink()
    for p, df in zip(parts, kept_frames):
        buf = io.BytesIO()
        df.write_parquet(buf)
        write_if_changed(inp / p["name"], buf.getvalue())
    new_job.update(prepared=True, fingerprint=fingerprint, parts=parts, input=total,
                   columns=list(kept_frames[0].columns),
                   dfn_index=str(Path(opts.dfn_index).resolve()) if opts.dfn_index else None)
    write_if_changed(inp / JOB_NAME, _json_bytes(new_job))
    return new_job


# -- resume ------------------------------------------------------------------------------------
def sweep(out: Path, names: list[str]) -> list[str]:
    """Delete what an interrupted run left behind; return the shards still to fetch."""
    pending = []
    for n in names:
        tar, pq, stats = out / f"{n}.tar", out / f"{n}.parquet", out / f"{n}_stats.json"
        if shard_done(out, n):
            continue
        pending.append(n)
        for f in (tar, pq, stats):
            f.unlink(missing_ok=True)
    _remove_tree(out / "_tmp")  # img2dataset's feather scratch files
    return pending


def shard_done(out: Path, name: str) -> bool:
    """Its stats parse, its tar exists, and its parquet reads with one row per attempted sample: two writers
    (or a damaged disk) can leave a broken parquet behind a complete-looking tar, which the summary reads."""
    stats = fetch_summary.read_stats(out / f"{name}_stats.json")
    if stats is None or not (out / f"{name}.tar").is_file():
        return False
    try:
        rows = storage.read_parquet(out / f"{name}.parquet", columns=list(fetch_summary.RECORD_COLUMNS)).height
    except Exception:  # pyarrow/polars raise many kinds (ComputeError, OSError, ArrowInvalid) for a bad file
        return False
    return rows == int(stats["count"])


def _remove_tree(path) -> None:
    if not storage.is_url(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = storage.filesystem(str(path))
    try:
        fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass


# -- running img2dataset -----------------------------------------------------------------------
@contextlib.contextmanager
def _img2dataset_hooks(opts: FetchOptions):
    """img2dataset has no hook for a custom resizer or downloader: download() builds `Resizer` and
    `Downloader` by name from img2dataset.main. Bind our subclasses there for the call; workers unpickle
    them from aimv2data."""
    import sys

    import img2dataset  # noqa: F401  (the package re-exports a function named `main`)

    from aimv2data.fetch_guard import GuardedDownloader
    from aimv2data.fetch_resize import NativeResizer

    i2d_main = sys.modules["img2dataset.main"]
    original = i2d_main.Resizer, i2d_main.Downloader
    i2d_main.Resizer = functools.partial(NativeResizer, keep_progressive=opts.keep_progressive)
    i2d_main.Downloader = functools.partial(GuardedDownloader, allow_private=opts.allow_private_addresses)
    try:
        yield
    finally:
        i2d_main.Resizer, i2d_main.Downloader = original


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_distributor(name: str) -> None:
    if name not in DISTRIBUTORS:
        raise FetchError(f"unknown distributor {name!r}: use one of {', '.join(DISTRIBUTORS)}", "distributor")
    if name != "multiprocessing":
        import importlib.util

        if importlib.util.find_spec(name) is None:
            # img2dataset's ray distributor silently does nothing when ray is missing
            raise FetchError(f"--distributor {name} needs the `{name}` package (pip install {name}) and a running "
                             f"{name} cluster; see img2dataset's distributed docs", "distributor")


@contextlib.contextmanager
def _shard_progress(total: int | None):
    """img2dataset's progress bar counts shards without a total, so it shows no share done and no ETA;
    give its tqdm the number of shards this run fetches for the call."""
    import img2dataset.distributor as dist

    original = dist.tqdm
    if total:
        dist.tqdm = functools.partial(original, total=total, unit="shard", desc="fetch", dynamic_ncols=True)
    try:
        yield
    finally:
        dist.tqdm = original


def run_img2dataset(opts: FetchOptions, out: Path, job: dict, n_shards: int, url_list=None,
                    mode: str = "incremental", extra_columns: tuple = (), todo: int | None = None) -> int | None:
    """One img2dataset.download over DIR/_input (or `url_list`). Returns the signal number when interrupted
    (SIGINT, SIGTERM), else None."""
    from img2dataset import download

    # with --distributor ray, fetch() (its only way in, retry_failed included) has already joined the cluster:
    # img2dataset's Ray distributor uses the cluster that ray.init joined
    interrupted = None
    main_thread = threading.current_thread() is threading.main_thread()
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    if main_thread:
        signal.signal(signal.SIGTERM, on_term)
    caption = "caption" in job["columns"]
    try:
        # OpenCV's decoder reads this cap (in every spawned worker) and refuses larger images up
        # front: the second line of defence behind NativeResizer's header check.
        with _img2dataset_hooks(opts), _shard_progress(todo), _env(
                OPENCV_IO_MAX_IMAGE_PIXELS=opts.max_pixels, NO_ALBUMENTATIONS_UPDATE=1):
            download(
                url_list=str(url_list or out / INPUT_DIR), input_format="parquet", output_folder=str(out),
                output_format="webdataset", url_col="url", caption_col="caption" if caption else None,
                save_additional_columns=additional_columns(opts.source, source_spec(opts.source, opts.url_col,
                                                           opts.caption_col), opts.verify_hash) + list(extra_columns),
                verify_hash=["src_sha256", "sha256"] if opts.verify_hash else None, compute_hash="sha256",
                image_size=opts.max_side or 1, resize_mode="keep_ratio_largest" if opts.max_side else "no",
                resize_only_if_bigger=True, encode_format="jpg", encode_quality=opts.quality, skip_reencode=True,
                max_image_area=opts.max_pixels, processes_count=opts.processes, thread_count=opts.threads,
                number_sample_per_shard=opts.shard_size, oom_shard_count=max(5, len(str(max(n_shards - 1, 0)))),
                timeout=opts.timeout, retries=opts.retries, distributor=opts.distributor,
                incremental_mode=mode, enable_wandb=False, extract_exif=True, max_shard_retry=1,
            )
    except SystemExit as e:  # img2dataset's SIGINT handler exits with status 0; ours with 128+signum
        interrupted = e.code - 128 if isinstance(e.code, int) and e.code > 128 else signal.SIGINT
        for child in multiprocessing.active_children():
            child.terminate()
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    return interrupted


def fetch(opts: FetchOptions, console=None) -> dict:
    """Prepare, resume, download, summarise. Returns the summary; raises FetchError for bad
    input (nothing touched) and FetchIncomplete when shards are missing at the end."""
    if opts.shard_size < 1:
        raise FetchError("--shard-size must be at least 1", "shard-size")
    if opts.limit is not None and opts.limit < 1:
        raise FetchError("--limit must be at least 1", "limit")
    if opts.max_side < 0:
        raise FetchError("--max-side must be 0 (never resize) or a positive number of pixels", "max-side")
    _check_distributor(opts.distributor)
    if opts.distributor == "ray":          # a cluster that does not answer: refused before anything is written
        from aimv2data.cluster import ClusterError, connect_ray

        try:
            connect_ray(opts.ray_address)
        except ClusterError as e:
            raise FetchError(str(e), "ray-address") from None
    if opts.retry_failed:
        return retry_failed(opts, console)
    out = output_path(opts.output)
    with output_locked(out) as lock:
        job = check_output(out)
        if job is not None:       # DIR is ours already: lock it before reading on
            lock()
            job = check_output(out)
        job = prepare(opts, out, job, lock)
        return _fetch_prepared(opts, out, job, console)


def _fetch_prepared(opts: FetchOptions, out, job: dict, console) -> dict:
    opts.verify_hash = job["settings"]["verify_hash"]
    names = shard_names(job["parts"], opts.shard_size)
    summary_path = out / fetch_summary.SUMMARY_NAME

    pending = sweep(out, names)
    t0, interrupted = time.perf_counter(), None
    if pending:
        summary_path.unlink(missing_ok=True)  # absent while a run is in progress
        if console is not None:
            console.print(f"[bold]aimv2 fetch[/]: {len(pending)} of {len(names)} shard(s) to fetch into {out}")
        interrupted = run_img2dataset(opts, out, job, len(names), todo=len(pending))
    elif console is not None:
        console.print(f"[bold]aimv2 fetch[/]: all {len(names)} shard(s) in {out} are done; nothing to fetch")
    run_s = time.perf_counter() - t0

    summary = build_summary(out, job, names)
    write_if_changed(summary_path, _json_bytes(summary))
    if console is not None:
        fetched_now = sum((fetch_summary.read_stats(out / f"{n}_stats.json") or {}).get("count", 0) for n in pending)
        console.print(fetch_summary.render(summary, run_s if pending else None, fetched_now))
    if interrupted:
        raise FetchIncomplete("interrupted: rerun the same command to resume (finished shards are kept)", summary,
                              int(interrupted))
    if not summary["complete"]:
        missing = summary["shards"]["missing"]
        raise FetchIncomplete(f"{len(missing)} shard(s) did not finish ({', '.join(missing[:5])}"
                              f"{', ...' if len(missing) > 5 else ''}); rerun the same command to resume", summary)
    return summary


def build_summary(out, job: dict, names: list[str]) -> dict:
    summary = fetch_summary.build(out, job, names)
    if job.get("retry_rounds"):
        from aimv2data.fetch_retry import retry_section

        summary["retries"] = retry_section(out, job, names)
    return summary


def retry_failed(opts: FetchOptions, console=None) -> dict:
    """`aimv2 fetch --retry-failed`: one retry round over a finished fetch (aimv2data/fetch_retry.py)."""
    from aimv2data import fetch_retry

    out = output_path(opts.output)
    with output_locked(out) as lock:
        fetch_retry.check_retry_target(out, read_job(out) if out.is_dir() else None)
        lock()                    # a fetch output: lock it, then read its record
        return _retry_locked(opts, out, fetch_retry.check_retry_target(out, read_job(out)), console)


def _retry_locked(opts: FetchOptions, out, job: dict, console) -> dict:
    from aimv2data import fetch_retry

    if opts.url_lists:   # the original command with --retry-failed added: its settings must be the record's
        opts.verify_hash = job["settings"]["verify_hash"] if opts.verify_hash is None else opts.verify_hash
        diff = _differences(opts.settings(), job["settings"])
        if diff:
            raise FetchError(f"{out} holds a fetch made with other settings ({'; '.join(diff)}); pass the original "
                             "flags, or --retry-failed --output DIR alone", "retry-failed")
    s = job["settings"]
    opts.source, opts.shard_size, opts.max_side, opts.max_pixels = s["source"], s["shard_size"], s["max_side"], \
        s["max_pixels"]
    opts.verify_hash, opts.keep_progressive, opts.quality = s["verify_hash"], s["keep_progressive"], s["quality"]
    if s["source"] == "parquet":
        opts.url_col, opts.caption_col = s["url_col"], s["caption_col"]
    names = shard_names(job["parts"], opts.shard_size)
    retry_names = [n for r in job.get("retry_rounds", []) for n in r["shards"]]
    pending = sweep(out, names + retry_names)
    unfinished = [n for n in pending if n in names]
    if unfinished:
        raise FetchError(f"the fetch in {out} is not finished ({len(unfinished)} shard(s) missing): rerun it "
                         "without --retry-failed first (it resumes), then retry", "retry-failed")
    summary_path = out / fetch_summary.SUMMARY_NAME
    shards, n = fetch_retry.prepare_round(opts, out, job, names, write_if_changed, _json_bytes)
    interrupted = None
    if shards:
        summary_path.unlink(missing_ok=True)   # absent while a run is in progress (img2dataset globs *.json)
        if console is not None:
            console.print(f"[bold]aimv2 fetch --retry-failed[/]: {n} sample(s) failed transiently; retrying them "
                          f"into {len(shards)} new shard(s) {shards[0]}..{shards[-1]} of {out}")
        rnd = job["retry_rounds"][-1]
        interrupted = run_img2dataset(opts, out, job, len(names), url_list=out / INPUT_DIR / rnd["url_list"],
                                      mode="extend", extra_columns=(fetch_retry.RETRY_COL,))
    elif console is not None:
        console.print(f"[bold]aimv2 fetch --retry-failed[/]: nothing left to retry in {out} "
                      "(no sample's last attempt failed transiently)")
    summary = build_summary(out, job, names)
    write_if_changed(summary_path, _json_bytes(summary))
    if console is not None:
        console.print(fetch_summary.render(summary))
        if "retries" in summary:
            r = summary["retries"]
            last = r["rounds"][-1] if r["rounds"] else {}
            console.print(f"retries: round {last.get('round')} recovered {last.get('recovered', 0)} of "
                          f"{last.get('to_retry', 0)}; after all rounds {r['success_after_retries']} succeeded, "
                          f"failures by reason {r['failures_by_reason_after_retries']}")
    if interrupted:
        raise FetchIncomplete("interrupted: rerun with --retry-failed to go on", summary, int(interrupted))
    return summary
