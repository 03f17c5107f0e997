"""fetch() and retry_failed(): the output checked and locked, the job prepared (or a retry round planned),
then the same tail for both: download the round, write and print the summary, say what is missing."""
from __future__ import annotations

import time

from aimv2data.fetch.download import Ended, Round, run_img2dataset
from aimv2data.fetch.errors import FetchError, FetchIncomplete
from aimv2data.fetch.options import FetchOptions
from aimv2data.fetch.output import (INPUT_DIR, check_output, json_bytes, log_path, output_locked, output_path,
                                    read_job, shard_count, shard_names, sweep, write_if_changed)
from aimv2data.fetch.prepare import prepare
from aimv2data.fetch.retry import RETRY_COL, check_retry_target, prepare_round, retry_section
from aimv2data.fetch.summary import SUMMARY_NAME, build, read_stats, render


def fetch(opts: FetchOptions, console=None) -> dict:
    """Prepare, resume, download, summarise. Returns the summary; raises FetchError for bad
    input (nothing touched) and FetchIncomplete when shards are missing at the end."""
    opts.check()
    _check_distributor(opts)
    if opts.retry_failed:
        return retry_failed(opts, console)
    out = output_path(opts.output)
    with output_locked(out) as lock:
        job = check_output(out)
        if job is not None:       # DIR is ours already: lock it before reading on
            lock()
            job = check_output(out)
        job = prepare(opts, out, job, lock)
        opts = opts.from_settings(job["settings"])
        names = shard_names(job, opts.shard_size)
        pending = sweep(out, names)
        return _download_and_summarise(
            opts, out, job, names, Round(pending),
            start=f"{len(pending)} of {len(names)} shard(s) to fetch into {out}",
            idle=f"all {len(names)} shard(s) in {out} are done; nothing to fetch",
            resume="rerun the same command to resume (finished shards are kept)", console=console)


def retry_failed(opts: FetchOptions, console=None) -> dict:
    """`aimv2 fetch --retry-failed`: one retry round over a finished fetch (retry.py)."""
    out = output_path(opts.output)
    with output_locked(out) as lock:
        check_retry_target(out, read_job(out) if out.is_dir() else None)
        lock()                    # a fetch output: lock it, then read its record
        job = check_retry_target(out, read_job(out))
        opts = _recorded(opts, out, job)
        names = shard_names(job, opts.shard_size)
        retry_names = [n for r in job.get("retry_rounds", []) for n in r["shards"]]
        unfinished = [n for n in sweep(out, names + retry_names) if n in names]
        if unfinished:
            raise FetchError(f"the fetch in {out} is not finished ({len(unfinished)} shard(s) missing): rerun it "
                             "without --retry-failed first (it resumes), then retry", "retry-failed")
        shards, n = prepare_round(opts, out, job, names)
        rnd, start = Round([]), ""
        if shards:
            rnd = Round(shards, url_list=out / INPUT_DIR / job["retry_rounds"][-1]["url_list"], mode="extend",
                        extra_columns=(RETRY_COL,))
            start = (f"{n} sample(s) failed transiently; retrying them into {len(shards)} new shard(s) "
                     f"{shards[0]}..{shards[-1]} of {out}")
        return _download_and_summarise(
            opts, out, job, names, rnd, command="aimv2 fetch --retry-failed", start=start,
            idle=f"nothing left to retry in {out} (no sample's last attempt failed transiently)",
            resume="rerun with --retry-failed to go on", console=console)


def _recorded(opts: FetchOptions, out, job: dict) -> FetchOptions:
    """The options of the job in `out`: its record's settings; the original command's own flags, when given
    with --retry-failed, must be the record's."""
    if opts.url_lists:
        if opts.verify_hash is None:
            opts.verify_hash = job["settings"]["verify_hash"]
        diff = opts.differences(job["settings"])
        if diff:
            raise FetchError(f"{out} holds a fetch made with other settings ({'; '.join(diff)}); pass the original "
                             "flags, or --retry-failed --output DIR alone", "retry-failed")
    return opts.from_settings(job["settings"])


def _check_distributor(opts: FetchOptions) -> None:
    if opts.distributor == "multiprocessing":
        return
    import importlib.util

    if importlib.util.find_spec(opts.distributor) is None:
        # img2dataset's ray distributor silently does nothing when ray is missing
        raise FetchError(f"--distributor {opts.distributor} needs the `{opts.distributor}` package (pip install "
                         f"{opts.distributor}) and a running {opts.distributor} cluster; see img2dataset's "
                         "distributed docs", "distributor")
    if opts.distributor == "ray":          # a cluster that does not answer: refused before anything is written
        from aimv2data.cluster import ClusterError, connect_ray

        try:
            connect_ray(opts.ray_address)
        except ClusterError as e:
            raise FetchError(str(e), "ray-address") from None


def build_summary(out, job: dict, names: list[str]) -> dict:
    summary = build(out, job, names, log_path(out))
    if job.get("retry_rounds"):
        summary["retries"] = retry_section(out, job, names)
    return summary


def _download_and_summarise(opts: FetchOptions, out, job: dict, names: list[str], rnd: Round, *, start: str,
                            idle: str, resume: str, console, command: str = "aimv2 fetch") -> dict:
    """Download the round (when it has shards), write and print the summary; FetchIncomplete when the run was
    interrupted, img2dataset failed, or shards are missing."""
    summary_path = out / SUMMARY_NAME
    t0, ended = time.perf_counter(), Ended()
    if rnd.shards:
        summary_path.unlink(missing_ok=True)   # absent while a run is in progress (img2dataset globs *.json)
        _say(console, f"[bold]{command}[/]: {start}")
        ended = run_img2dataset(opts, out, job, shard_count(job, opts.shard_size), rnd, console)
    else:
        _say(console, f"[bold]{command}[/]: {idle}")
    run_s = time.perf_counter() - t0

    summary = build_summary(out, job, names)
    write_if_changed(summary_path, json_bytes(summary))
    if console is not None:
        fetched_now = sum((read_stats(out / f"{n}_stats.json") or {}).get("count", 0) for n in rnd.shards)
        console.print(render(summary, run_s if rnd.shards else None, fetched_now))
    if ended.interrupted:
        raise FetchIncomplete(f"interrupted: {resume}", summary, int(ended.interrupted))
    if ended.failed:
        raise FetchIncomplete(f"img2dataset failed ({ended.failed}); its output is in {summary['log']}; {resume}",
                              summary)
    if not summary["complete"]:
        missing = summary["shards"]["missing"]
        raise FetchIncomplete(f"{len(missing)} shard(s) did not finish ({', '.join(missing[:5])}"
                              f"{', ...' if len(missing) > 5 else ''}); {resume}", summary)
    return summary


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)
