"""The `trainer` part: the real `aimv2 train` (train.trainer.train, what the command calls) on the carried payload
of real photos (payload.py), as a user would run it on one GPU: L, bf16, torch.compile, DALI `mixed` when
nvidia.dali imports (else `pil` on the host cores), fixed 224 px and native resolution. Per run it reports
end-to-end images/s against the same compiled train_step on synthetic batches of the same shape (the data
path's efficiency, goal >= 0.95), data wait per step, peak memory against the `--dry-run` plan, graphs,
compile seconds and recompiles, host syncs per step, each rank's devices; the fixed run is stopped by a real
SIGTERM, checkpoints and is resumed. Each run degrades on its own (an error is recorded, the next goes on).
"""
from __future__ import annotations

import gc
import logging
import os
import resource
import signal
import statistics
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from .common import Budget, Sizes, importable, reason

GOAL = 0.95               # end-to-end images/s over the synthetic step's
SYNC_WARNING = "synchroniz"   # torch.cuda.set_sync_debug_mode("warn")'s message: "called a synchronizing CUDA operation"
AFTER_SIGTERM = 6         # steps of the fixed run after the one that sends SIGTERM
NEED_S = {"fixed": 240.0, "native": 210.0}   # seconds each run needs on an H100, compiles included (docs/gpucheck.md)


def part_trainer(device: torch.device, sizes: Sizes, workdir: Path, dry_run: bool, ctx: dict, budget: Budget,
                 data_dir: str | None = None, **_) -> dict:
    why = importable("polars")
    if why is not None:
        return {"status": "skipped", "reason": f"the loader's manifest side needs polars ({why}); carry its wheels "
                "(docs/gpucheck.md)"}
    from . import payload

    root = Path(workdir) / "trainer"
    if data_dir:
        data = payload.load(data_dir)
    else:  # no carried payload: a small one here (the dry run's, or a GPU machine that has skimage)
        folder = root / "payload"
        if not (folder / payload.PAYLOAD_JSON).is_file():
            payload.prepare(folder, max_mb=2 if dry_run else 40, long_side=(96, 160) if dry_run else (400, 900),
                            max_images=48 if dry_run else 4096)
        data = payload.load(folder)
    ctx["data"] = {"manifest": data["manifest"], "tokenizer": data["tokenizer"]}  # the steps part's loader rows
    # DALI `mixed` where it imports and the decode part (when it ran) decoded with it
    decoder = "dali" if importable("nvidia.dali") is None and ctx.get("dali", "ok") == "ok" else "pil"
    runs, init = {}, None
    for res in ("fixed", "native"):
        if device.type == "cuda" and budget.left() < NEED_S[res]:
            runs[res] = {"status": "skipped", "reason": f"time budget: {budget.left():.0f} s left, {res} needs "
                         f"~{NEED_S[res]:.0f} s"}
            continue
        t0 = time.perf_counter()
        try:
            runs[res] = {"status": "ok", **_one_run(res, device, sizes, data, decoder, root, dry_run, init)}
            run_dir = runs[res].pop("run_dir")
            init = run_dir if res == "fixed" else init   # the native stage starts from these weights
        except Exception as e:
            runs[res] = {"status": "error", "reason": reason(e)}
        runs[res]["seconds"] = round(time.perf_counter() - t0, 1)
        _free(device)
        print(f"  trainer: {res} {runs[res]['status']} in {runs[res]['seconds']} s", flush=True)
    _drop_checkpoints(root)
    return {"steps": sizes.trainer_steps, "decoder": decoder, "payload": data["payload"], "runs": runs,
            "goal_efficiency": GOAL}


def train_config(res: str, device: torch.device, sizes: Sizes, data: dict, decoder: str, out: Path,
                 dry_run: bool, init: str | None = None):
    """The `aimv2 train` settings of one run: what a user passes on one GPU. Fixed 224 is the pretrain stage;
    native resolution is the native stage from the fixed run's weights (`--init`), or, when that run did not
    finish, pretrain at native resolution."""
    from ..train.config import TrainConfig
    from ..train.distributed import affinity_cpus

    native = res == "native"
    n_areas = sizes.trainer_native_areas if native else 0
    # the fixed run goes on after its SIGTERM step: room for the signal to land, then --resume finishes it
    steps = sizes.trainer_warmup + sizes.trainer_steps + (0 if native else AFTER_SIGTERM)
    workers = (4 if decoder == "dali" else max(1, affinity_cpus() - 1)) if not dry_run else 0
    return TrainConfig(manifest=data["manifest"], tokenizer=data["tokenizer"], out=str(out),
                       model=sizes.trainer_model, steps=steps, native_res=native, init=init,
                       stage="native" if native and init else "pretrain",
                       resolution=None if native else sizes.trainer_resolution, batch_size=sizes.trainer_batch,
                       batch_patches=sizes.trainer_patches, compile=device.type == "cuda", image_decoder=decoder,
                       workers=workers, device=str(device), save_every=0, keep=1, progress=False, log_interval=0,
                       seed=native_seed(steps, n_areas, sizes.trainer_native_max_area) if native else 0,
                       peak_flops=1e12 if dry_run else None)


def native_seed(steps: int, areas: int, max_area: int = 4096) -> int:
    """The first seed whose `steps` native-resolution steps draw at most `areas` distinct areas, none above
    `max_area` (the sampler's area of step t is a pure function of (seed, t)): on CUDA each grid is one static
    graph of ~60 s for L, so the check bounds them; a real run's many grids are issue 22 point 3's."""
    from aimv2data.loader.sampler import AREA, area_exponent, unit

    for seed in range(1_000_000):
        drawn = {area_exponent(unit(seed, t, AREA)) for t in range(steps)}
        if len(drawn) <= areas and 2 ** max(drawn) <= max_area:
            return seed
    raise ValueError(f"no seed below 1e6 draws at most {areas} areas <= {max_area} in {steps} steps")


def _one_run(res: str, device: torch.device, sizes: Sizes, data: dict, decoder: str, root: Path,
             dry_run: bool, init: str | None) -> dict:
    from ..train.trainer import train

    folder = root / f"{res}-{int(time.time())}"
    cfg = train_config(res, device, sizes, data, decoder, folder / "run", dry_run, init if res == "native" else None)
    plan = train(replace(cfg, dry_run=True))["plan"]
    first = sizes.trainer_warmup + sizes.trainer_steps
    out = {"config": {k: getattr(cfg, k) for k in ("model", "stage", "init", "steps", "native_res", "resolution",
                                                   "batch_size", "batch_patches", "compile", "image_decoder",
                                                   "workers", "seed")},
           "dry_run_estimate_gib": plan.peak / 2**30, "device_memory_gib": plan.device_memory / 2**30}
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with _watch(device, Path(cfg.out) / "metrics.jsonl", sizes.trainer_warmup, first,
                sigterm=res == "fixed") as seen:
        summary = train(cfg)
    out.update(_end_to_end(Path(cfg.out), sizes.trainer_warmup, first), run_status=summary["status"],
               loss_start=summary.get("loss_start"), loss_end=summary.get("loss_end"),
               peak_memory=_peak(device, plan.peak), compile=seen["compile"], host_syncs=seen["syncs"],
               devices=summary.get("devices"))
    if res == "fixed":
        out["sigterm_resume"] = _resume(cfg, summary, device)
    out["synthetic"] = _synthetic(cfg, out, device, sizes)
    if out["synthetic"].get("images_per_s"):
        out["efficiency"] = out["images_per_s"] / out["synthetic"]["images_per_s"]
    return {**out, "run_dir": cfg.out}


@contextmanager
def _watch(device: torch.device, metrics: Path, warmup: int, last: int, sigterm: bool):
    """While `train()` runs: count graphs, compile seconds and recompiles (dynamo's counters and its `recompiles`
    log); count host syncs over steps warmup+1..last (set_sync_debug_mode, switched by a thread that watches
    metrics.jsonl); with `sigterm`, send this process a real SIGTERM once step `last` is logged."""
    import torch._dynamo.utils as dynamo_utils

    seen = {"compile": {}, "syncs": {}}
    recompiles: list[str] = []
    handler = _ListHandler(recompiles)
    log = logging.getLogger("torch._dynamo")
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    compiled_before = _compile_seconds()
    torch._logging.set_logs(recompiles=True)
    log.addHandler(handler)
    done = threading.Event()
    window = {"on": None, "off": None}
    thread = threading.Thread(target=_step_watcher, args=(metrics, warmup, last, sigterm, device, window, done),
                              daemon=True)
    # a SIGTERM that lands after train() returned must not end the check: train's StopRequest restores this
    late = signal.signal(signal.SIGTERM, lambda *_: print("gpucheck: a late SIGTERM, ignored", flush=True))
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            thread.start()
            yield seen
    finally:
        done.set()
        thread.join(timeout=5)
        signal.signal(signal.SIGTERM, late)
        _set_sync_mode(device, 0)
        log.removeHandler(handler)
        torch._logging.set_logs()
    counters = {k: dict(v) for k, v in dynamo_utils.counters.items()}
    seen["compile"] = {"graphs": counters.get("stats", {}).get("unique_graphs", 0),
                       "frames": counters.get("frames", {}).get("total", 0),
                       "compile_s": round(_compile_seconds() - compiled_before, 1), "recompiles": len(recompiles),
                       "recompile_reasons": [r.splitlines()[-1].strip()[:200] for r in recompiles[:8]],
                       "run_s": round(time.perf_counter() - t0, 1)}
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    steps = last - warmup
    seen["syncs"] = ({"per_step": len(syncs) / steps, "steps": steps, "where": sorted({f"{Path(w.filename).name}:"
                                                                                       f"{w.lineno}" for w in syncs})}
                     if device.type == "cuda" and window["off"] else
                     {"per_step": None, "reason": "not measured: torch.cuda.set_sync_debug_mode needs CUDA"
                      if device.type != "cuda" else "the step window was not seen"})


class _ListHandler(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record):
        if "__recompiles" in record.name:
            self.into.append(record.getMessage())


def _step_watcher(metrics: Path, warmup: int, last: int, sigterm: bool, device, window: dict,
                  done: threading.Event) -> None:
    """Polls metrics.jsonl: sync counting on after step `warmup`, off after step `last`, then the SIGTERM."""
    while not done.wait(0.002):
        try:
            n = metrics.read_bytes().count(b"\n")
        except OSError:
            continue
        if window["on"] is None and n >= warmup:
            _set_sync_mode(device, 1)
            window["on"] = n
        if window["off"] is None and n >= last:
            _set_sync_mode(device, 0)
            window["off"] = n
            if sigterm:
                os.kill(os.getpid(), signal.SIGTERM)
            return


def _set_sync_mode(device: torch.device, mode: int) -> None:
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def _compile_seconds() -> float:
    """Seconds dynamo has spent compiling in this process (its `dynamo_timed` metrics; _watch takes differences)."""
    import torch._dynamo.utils as dynamo_utils

    return float(sum(getattr(dynamo_utils, "compilation_time_metrics", {}).get("_compile.compile_inner", [])))


def _end_to_end(run: Path, warmup: int, last: int) -> dict:
    """From the run's metrics.jsonl: steps warmup+1..last, less each grid's first step (it compiles)."""
    from aimv2data.atomic import read_jsonl

    records, seen, timed = read_jsonl(run / "metrics.jsonl"), set(), []
    for r in records:
        grid = tuple(r["grid"])
        if warmup < r["step"] <= last and grid in seen:
            timed.append(r)
        seen.add(grid)
    if not timed:
        raise ValueError(f"{run}: no timed step in metrics.jsonl (steps {warmup + 1}..{last})")
    grids = [tuple(r["grid"]) for r in timed]
    main = max(set(grids), key=grids.count)
    return {"images_per_s": sum(r["batch"] for r in timed) / sum(r["step_time"] for r in timed),
            "step_ms_median": 1e3 * statistics.median(r["step_time"] for r in timed),
            "data_wait_ms_mean": 1e3 * statistics.fmean(r["data_time"] for r in timed),
            "data_wait_ms_max": 1e3 * max(r["data_time"] for r in timed),
            "mfu_mean": statistics.fmean(r["mfu"] for r in timed), "timed_steps": len(timed),
            "first_step_s": records[0]["step_time"],   # the compile of the first grid is in it
            "grids": sorted(list(g) for g in seen), "main_grid": list(main),
            "main_batch": next(r["batch"] for r in timed if tuple(r["grid"]) == main)}


def _peak(device: torch.device, estimate: int) -> dict:
    if device.type == "cuda":
        measured = torch.cuda.max_memory_reserved(device)
        out = {"allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30, "reserved_gib": measured / 2**30,
               "note": "torch's caching allocator; the estimate adds ~1 GiB of CUDA runtime"}
        torch.cuda.reset_peak_memory_stats(device)
    else:  # the process's peak resident set since it started (the whole check), in KiB on Linux
        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = {"max_rss_gib": measured / 2**30, "note": "process peak RSS since start (every part so far)"}
    return {**out, "estimate_gib": estimate / 2**30, "measured_over_estimate": measured / estimate}


def _resume(cfg, summary: dict, device: torch.device) -> dict:
    """The SIGTERM's outcome (status interrupted, exit code 143, a checkpoint) and `--resume` to the end."""
    from ..train.trainer import train

    out = {"status_after_sigterm": summary["status"], "exit_code": summary.get("exit_code"),
           "signal": summary.get("signal"), "stopped_at": summary["step"], "checkpoint": summary.get("checkpoint"),
           "save_s": summary.get("save_time")}
    if summary["status"] != "interrupted":
        return {**out, "status": "error", "reason": f"the run ended {summary['status']!r}, not interrupted"}
    _free(device)
    t0 = time.perf_counter()
    again = train(replace(cfg, resume=True))
    ok = again["status"] == "done" and again.get("resumed_from") == summary["step"] and again["step"] == cfg.steps
    return {**out, "status": "ok" if ok else "error", "resumed_status": again["status"],
            "resumed_from": again.get("resumed_from"), "final_step": again["step"],
            "resume_s": round(time.perf_counter() - t0, 1), "loss_end": again.get("loss_end")}


def _synthetic(cfg, e2e: dict, device: torch.device, sizes: Sizes) -> dict:
    """The same compiled train_step of the same run (trainer.build_run) on synthetic uint8 batches of the
    end-to-end run's main shape: no loader in the loop. Host syncs counted over its steps too."""
    from ..train.distributed import DistInfo
    from ..train.tokenizer import Tokenizer
    from ..train.trainer import build_run
    from .steps import synthetic_batches, time_steps

    _free(device)
    run = build_run(replace(cfg, out=str(Path(cfg.out).parent / "synthetic")), DistInfo(), device)
    grid, B = tuple(e2e["main_grid"]), e2e["main_batch"]
    text = replace(sizes, vocab=run.mcfg.decoder.vocab_size, text_len=Tokenizer(cfg.tokenizer).max_len)
    batches = synthetic_batches(B, grid, text, device)
    times = time_steps(run, batches, sizes.trainer_steps, sizes.trainer_warmup)
    syncs = _count_syncs(run, batches, device)
    dt = statistics.median(times)
    return {"images_per_s": B / dt, "step_ms_median": 1e3 * dt, "batch": B, "grid": list(grid), "host_syncs": syncs}


def _count_syncs(run, batches: list, device: torch.device, steps: int = 3) -> dict:
    """Host syncs per train_step (torch.cuda.set_sync_debug_mode "warn"), no synchronize of ours in between."""
    from ..train import trainer
    from ..train.preempt import StopRequest

    if device.type != "cuda":
        return {"per_step": None, "reason": "not measured: torch.cuda.set_sync_debug_mode needs CUDA"}
    stop = StopRequest()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _set_sync_mode(device, 1)
            try:
                for i in range(steps):
                    trainer.train_step(run, batches[i % len(batches)], stop)
            finally:
                _set_sync_mode(device, 0)
    finally:
        stop.restore()
    syncs = [w for w in caught if SYNC_WARNING in str(w.message)]
    return {"per_step": len(syncs) / steps, "where": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _drop_checkpoints(folder: Path) -> None:
    """An L checkpoint is ~5 GB: the check keeps the runs' logs, not their weights."""
    import shutil

    for ck in folder.rglob("checkpoints"):
        shutil.rmtree(ck, ignore_errors=True)
