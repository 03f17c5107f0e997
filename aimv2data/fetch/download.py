"""One img2dataset.download call: our resizer and downloader bound in, its own output (prints from this
process, its workers and its logger process, its tqdm) kept in DIR/_logs/img2dataset.log, and our own
progress line (shards done, samples ok / failed) on the terminal instead."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback

from aimv2data import storage
from aimv2data.fetch.input import additional_columns, source_spec
from aimv2data.fetch.options import FetchOptions
from aimv2data.fetch.output import INPUT_DIR, log_path, name_width
from aimv2data.fetch.summary import read_stats
from aimv2data.fetch.watch import WorkerDied, watched_pool

# img2dataset imports albumentations, which otherwise checks PyPI for a newer version on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


@dataclasses.dataclass
class Round:
    """What one download call fetches: `shards` (their names) from `url_list` (None: DIR/_input)."""
    shards: list[str]
    url_list: object = None
    mode: str = "incremental"          # img2dataset's incremental_mode; "extend" numbers new shards after the last
    extra_columns: tuple = ()


@dataclasses.dataclass
class Ended:
    interrupted: int | None = None     # the signal that stopped it (SIGINT, SIGTERM)
    failed: str | None = None          # img2dataset raised: what, in one line (the traceback is in the log)


@contextlib.contextmanager
def _img2dataset_hooks(opts: FetchOptions):
    """img2dataset has no hook for a custom resizer or downloader: download() builds `Resizer` and
    `Downloader` by name from img2dataset.main. Bind our subclasses there for the call; workers unpickle
    them from aimv2data."""
    import img2dataset  # noqa: F401  (the package re-exports a function named `main`)

    from aimv2data.fetch.guard import GuardedDownloader
    from aimv2data.fetch.resize import NativeResizer

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


@contextlib.contextmanager
def _shard_progress(total: int | None):
    """img2dataset's progress bar counts shards without a total, so it shows no share done and no ETA;
    give its tqdm (in the log) the number of shards this run fetches for the call."""
    import img2dataset.distributor as dist

    original = dist.tqdm
    if total:
        dist.tqdm = functools.partial(original, total=total, unit="shard", desc="fetch", dynamic_ncols=True)
    try:
        yield
    finally:
        dist.tqdm = original


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):   # io.UnsupportedOperation is both; Click's test runner
        return None


@contextlib.contextmanager
def chatter_to(log, keep=None):
    """Everything written to file descriptors 1 and 2 (and sys.stdout / sys.stderr) goes to `log` (a local
    file, appended) for the block: img2dataset prints from this process and from processes it spawns, which
    inherit the descriptors. Yields a stream that still writes where `keep` did (our progress line)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for s in (sys.stdout, sys.stderr):
        s.flush()
    with open(log, "a", buffering=1) as f, contextlib.ExitStack() as stack:
        f.write(f"\n== aimv2 fetch: img2dataset run started {time.strftime('%Y-%m-%d %H:%M:%S')} ==\n")
        kept = keep
        if keep is not None and _fileno(keep) in (1, 2):    # the terminal: a copy of its descriptor survives
            kept = stack.enter_context(os.fdopen(os.dup(_fileno(keep)), "w", buffering=1))
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield kept
        finally:
            for s in (sys.stdout, sys.stderr, f):
                s.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def _logged(out, keep):
    """chatter_to DIR's log; for a URL output, a local file uploaded (after what the log already held) at the
    end."""
    target = log_path(out)
    if not storage.is_url(target):
        with chatter_to(target, keep) as kept:
            yield kept
        return
    with tempfile.TemporaryDirectory(prefix="aimv2-fetch-log-") as tmp:
        local = log_path(storage.upath(tmp))
        try:
            with chatter_to(local, keep) as kept:
                yield kept
        finally:
            before = target.read_bytes() if target.exists() else b""
            storage.write_bytes(target, before + local.read_bytes())


class ShardProgress:
    """Our progress line: shards done of those this call fetches, samples ok and failed. Read from the stats
    file img2dataset writes as each shard ends (one listing of DIR per poll), so it works for every
    distributor, workers on other machines included."""

    def __init__(self, out, shards: list[str], stream, interval_s: float | None = None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.out, self.todo, self.done = out, set(shards), {}
        self.interval_s = interval_s or (10.0 if storage.is_url(out) else 1.0)
        self.bar = Progress(TextColumn("[bold]fetch[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                            TextColumn("{task.fields[ok]} ok, {task.fields[failed]} failed"), TimeElapsedColumn(),
                            console=Console(file=stream), transient=False,
                            redirect_stdout=False, redirect_stderr=False)   # what others print goes to the log
        self.task = self.bar.add_task("fetch", total=len(shards), ok=0, failed=0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aimv2-fetch-progress", daemon=True)

    def poll(self) -> tuple[int, int, int]:
        """(shards done, samples ok, samples failed) so far."""
        for p in self.out.glob("*_stats.json"):
            name = p.name[: -len("_stats.json")]
            if name in self.todo and name not in self.done:
                s = read_stats(p)
                if s is not None:
                    self.done[name] = (int(s["successes"]), int(s["count"]) - int(s["successes"]))
        ok = sum(v[0] for v in self.done.values())
        failed = sum(v[1] for v in self.done.values())
        self.bar.update(self.task, completed=len(self.done), ok=ok, failed=failed)
        return len(self.done), ok, failed

    def _run(self):
        while not self._stop.wait(self.interval_s):
            with contextlib.suppress(Exception):    # a listing that fails once is tried again next time
                self.poll()

    def __enter__(self):
        self.bar.start()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):
            self.poll()
        self.bar.stop()


def run_img2dataset(opts: FetchOptions, out, job: dict, n_shards: int, rnd: Round, console=None) -> Ended:
    """One img2dataset.download over the round's url list into DIR, with our progress line on `console` (a rich
    Console; None: none). Never raises for what happens inside it: an interruption (SIGINT, SIGTERM) or a
    failure is returned, so the caller still writes the summary."""
    # with --distributor ray, fetch() (its only way in, retry_failed included) has already joined the cluster:
    # img2dataset's Ray distributor uses the cluster that ray.init joined
    ended = Ended()
    main_thread = threading.current_thread() is threading.main_thread()
    old_int, old_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    if main_thread:
        signal.signal(signal.SIGTERM, on_term)
    try:
        with _logged(out, console.file if console is not None else None) as shown, \
                (ShardProgress(out, rnd.shards, shown) if console is not None else contextlib.nullcontext()):
            try:
                _download(opts, out, job, n_shards, rnd)
            except SystemExit as e:  # img2dataset's SIGINT handler exits with status 0; ours with 128+signum
                ended.interrupted = e.code - 128 if isinstance(e.code, int) and e.code > 128 else signal.SIGINT
                _end_children()
            except WorkerDied as e:   # the pool is gone; img2dataset's logger process is not
                ended.failed = str(e)
                _end_children()
            except Exception as e:  # noqa: BLE001  (whatever img2dataset raises: kept in the log, named in one line)
                traceback.print_exc()           # into the log
                ended.failed = f"{type(e).__name__}: {e}"
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    return ended


def _end_children() -> None:
    """img2dataset's processes (download workers, its logger), when its call did not end them itself."""
    for child in multiprocessing.active_children():
        child.terminate()


def _download(opts: FetchOptions, out, job: dict, n_shards: int, rnd: Round) -> None:
    from img2dataset import download

    spec = source_spec(opts.source, opts.url_col, opts.caption_col)
    # OpenCV's decoder reads this cap (in every spawned worker) and refuses larger images up
    # front: the second line of defence behind NativeResizer's header check.
    with _img2dataset_hooks(opts), _shard_progress(len(rnd.shards)), watched_pool(), _env(
            OPENCV_IO_MAX_IMAGE_PIXELS=opts.max_pixels, NO_ALBUMENTATIONS_UPDATE=1):
        download(
            url_list=str(rnd.url_list or out / INPUT_DIR), input_format="parquet", output_folder=str(out),
            output_format="webdataset", url_col="url", caption_col="caption" if "caption" in job["columns"] else None,
            save_additional_columns=additional_columns(opts.source, spec, opts.verify_hash) + list(rnd.extra_columns),
            verify_hash=["src_sha256", "sha256"] if opts.verify_hash else None, compute_hash="sha256",
            image_size=opts.max_side or 1, resize_mode="keep_ratio_largest" if opts.max_side else "no",
            resize_only_if_bigger=True, encode_format="jpg", encode_quality=opts.quality, skip_reencode=True,
            max_image_area=opts.max_pixels, processes_count=opts.processes, thread_count=opts.threads,
            number_sample_per_shard=opts.shard_size, oom_shard_count=name_width(n_shards),
            timeout=opts.timeout, retries=opts.retries, distributor=opts.distributor,
            incremental_mode=rnd.mode, enable_wandb=False, extract_exif=True, max_shard_retry=1,
        )
