"""`aimv2 bench loader`: stream S steps from a manifest and measure what the trainer would get.

Figures: images/s and patches/s over the timed steps (after `warmup` untimed ones), images per
CPU-second (steadier than wall time on a shared machine), budget use
sum(B*h*w) / (steps*C) (C = B*R^2/p^2 at fixed resolution, so 1.0 there), padding (fraction of output
pixels without image content; 0 by construction) and decode replacements.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _Timed:
    """What the timed steps (those after the warmup) add up to."""

    def __init__(self):
        self.images = self.patches = self.steps = self.replaced = 0
        self.padding = 0.0
        self.areas: Counter = Counter()
        self.sources: Counter = Counter()

    def add(self, batch) -> None:
        b, (h, w) = len(batch), batch.grid
        self.images += b
        self.patches += b * h * w
        self.steps += 1
        self.padding += batch.padding
        self.areas[batch.area] += 1
        self.sources.update(batch.sources)
        self.replaced += len(batch.replaced)


def run_bench(manifest, *, native_res: bool, batch_patches: int, resolution: int, batch_size: int,
              decoder: str, workers: int, steps: int, warmup: int = 2, seed: int = 0,
              draft: bool = True, batch_rule: str = "area", steps_log: str | None = None,
              progress: bool = True, **loader_kw) -> dict:
    from tqdm import tqdm

    from .loader import Loader

    loader = Loader(manifest, native_res=native_res, batch_patches=batch_patches, resolution=resolution,
                    batch_size=batch_size, decoder=decoder, workers=workers, seed=seed, draft=draft,
                    batch_rule=batch_rule, **loader_kw)
    c = loader.budget
    log = None
    if steps_log:
        Path(steps_log).parent.mkdir(parents=True, exist_ok=True)
        log = open(steps_log, "w")
    timed = _Timed()
    bar = tqdm(total=warmup + steps, desc=f"loader {decoder}", unit="step", disable=not progress, leave=False)
    try:
        t0, c0 = _stream(loader, manifest, warmup, steps, timed, log, bar)
    finally:
        bar.close()
        if log is not None:
            log.close()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    cpu = max(_cpu() - c0, 1e-9)
    n_img, n_patch, n_steps = timed.images, timed.patches, timed.steps
    return {
        "manifest": str(manifest), "mode": "native" if native_res else f"fixed-{resolution}",
        "decoder": decoder, "device": _device(loader),
        "workers": workers, "draft": draft, "batch_patches": c, "batch_rule": batch_rule if native_res else None,
        "batch_size": None if native_res else batch_size, "steps": n_steps, "warmup": warmup,
        "images": n_img, "patches": n_patch, "elapsed_s": round(elapsed, 4),
        "images_per_s": round(n_img / elapsed, 2), "patches_per_s": round(n_patch / elapsed, 1),
        "cpu_s": round(cpu, 4), "images_per_cpu_s": round(n_img / cpu, 2),
        "budget_use": round(n_patch / max(1, n_steps * c), 6),
        "padding": round(timed.padding / max(1, n_steps), 6),
        "replaced": timed.replaced, "areas": {str(a): n for a, n in sorted(timed.areas.items())},
        "mix": {loader._name(k): round(v, 6) for k, v in loader.weights.items()},
        "sources": dict(sorted(timed.sources.items())), "source_epochs": loader.source_epochs(),
        "cpu": cpu_model(), "cpus": os.cpu_count(),
    }


def _stream(loader, manifest, warmup: int, steps: int, timed: _Timed, log, bar) -> tuple[float, float]:
    """Draw warmup + steps batches (segment after segment), timing the last `steps` into `timed`; one line per
    step into `log`. Returns the wall and CPU clocks at the first timed step."""
    t_first, c_first = time.perf_counter(), _cpu()
    t0 = c0 = None
    done = 0
    while done < warmup + steps:
        t_step = time.perf_counter()
        produced = False
        for batch in loader:
            produced = True
            now = time.perf_counter()
            if done == warmup:
                t0 = now if warmup else t_first
                c0 = _cpu() if warmup else c_first
            if done >= warmup:
                timed.add(batch)
            if log is not None:
                log.write(json.dumps(_step_record(batch, done, now - t_step, done >= warmup, loader.budget)) + "\n")
            t_step = now
            done += 1
            bar.update(1)
            if done >= warmup + steps:
                break
        if not produced:
            raise RuntimeError(f"{manifest}: a loader segment produced no batch (manifest too small for the batch?)")
    if t0 is None:   # warmup >= all steps produced
        t0, c0 = t_first, c_first
    return t0, c0


def _step_record(batch, done: int, seconds: float, timed: bool, c: int) -> dict:
    """One line of --steps-log."""
    return {"step": done, "global_step": batch.global_step, "source_epoch": batch.source_epoch,
            "area": batch.area, "grid_h": batch.grid[0], "grid_w": batch.grid[1],
            "batch_size": len(batch), "patches": len(batch) * batch.grid[0] * batch.grid[1],
            "budget_use": len(batch) * batch.grid[0] * batch.grid[1] / c,
            "padding": batch.padding, "replaced": len(batch.replaced),
            "sources": dict(Counter(batch.sources)),
            "time_s": round(seconds, 6), "timed": timed}


def _cpu() -> float:
    """CPU seconds of this process (all its threads: DALI's included) and of its reaped children
    (DataLoader workers once they exit). On a shared machine, images per CPU-second is the steadier
    per-core figure; wall-clock images/s is what a trainer sees."""
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def _device(loader) -> str:
    dec = loader.maker._decoder
    return getattr(dec, "device", "cpu") if dec is not None else "cpu"
