"""Per-step metrics (RUN/metrics.jsonl), throughput and MFU.

MFU (`mfu`) = all ranks' model FLOPs per second / (ranks x a fixed reference peak, `reference_peak`): the
datasheet's dense bf16 peak for known GPUs; elsewhere the best large-matmul FLOP/s ever measured on the machine
(cached), because one measurement per start ranged 75-302 GFLOP/s run to run on a shared CPU and made MFU incomparable.
Model FLOPs come from `flops.step_flops` (matmuls only, backward = 2x forward), so MFU is what the
model needs, not what the implementation happened to execute (no recompute, no masked-out savings).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from aimv2data.atomic import read_jsonl, write_text_atomic

from ..model.aimv2 import LOSS_TERMS, TOTAL_LOSS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                min_time: float = 0.3) -> float:
    """Best FLOP/s of an n x n @ n x n matmul on `device` in `dtype` (n: 2048 on CPU, 8192 on GPU)."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pools, cuBLAS handles, clocks
    _sync(device)
    best, spent, reps = 0.0, 0.0, 0
    while spent < min_time or reps < 3:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        dt = time.perf_counter() - t0
        best, spent, reps = max(best, 2 * n ** 3 / dt), spent + dt, reps + 1
    return best


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s per GPU: a fixed reference,
# so MFU compares across runs. Matched on torch.cuda.get_device_name(); fp32 runs use the same reference.
def mfu(flops: float, seconds: float, peak: float, devices: int = 1) -> float:
    """Model FLOPs utilisation, the one definition (trainer and `bench gpu`): the model FLOPs of every rank's
    batch in a step (flops.step_flops, summed over ranks: native resolution's ranks draw different grids) over
    the step's time and `devices` x `peak`, one device's stated peak (reference_peak)."""
    return flops / seconds / (peak * devices)


DATASHEET_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756.5e12), ("H100 NVL", 835.5e12), ("H100", 989.4e12),
                  ("A100", 312e12), ("L40S", 362.05e12), ("A10G", 70e12), ("L4", 121e12))


def reference_peak(device: torch.device, dtype: torch.dtype,
                   cache: str | os.PathLike | None = None) -> tuple[float, str]:
    """The FLOP/s MFU divides by, and where it comes from. A GPU with a datasheet entry: its dense bf16
    peak. Otherwise (CPUs, unknown GPUs) one matmul measurement per start ranged 4x run to run on a shared
    machine, so the reference is the best measurement ever made on this machine for this device and
    dtype, kept in `cache` (default ~/.cache/aimv2/peak_flops.json): it only rises towards the true peak,
    and runs measured against the same cache compare."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in DATASHEET_BF16:
            if key in name:
                return flops, f"datasheet bf16 dense peak of {name}"
    import platform

    if cache is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aimv2" / "peak_flops.json"
    cache = Path(cache)
    key = f"{platform.node()}|{device.type}|{_device_model(device)}|{dtype}|{torch.get_num_threads()} threads"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    measured = matmul_peak(device, dtype)
    best = max(measured, float(known.get(key, 0.0)))
    if best > known.get(key, 0.0):
        try:
            known[key] = best
            write_text_atomic(cache, json.dumps(known, indent=1))
        except OSError:
            pass
    return best, f"best {device.type} matmul ever measured on this machine ({cache})"


def _device_model(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "cpu")
    except OSError:
        return "cpu"


# metrics.jsonl keys renamed since (issue 23 point 4: "epoch" was the batch's source epoch); records of
# older runs are read, and a resumed old run's file rewritten, under the new names.
RENAMED = {"epoch": "source_epoch"}


def upgrade(record: dict) -> dict:
    return {RENAMED.get(k, k): v for k, v in record.items()}


class MetricsLog:
    """RUN/metrics.jsonl: one JSON object per optimiser step, flushed as written.

    `resume_step` (steps already done by the checkpoint resumed from) drops the lines after it (a run
    interrupted after its last checkpoint logged steps it will now redo), so the file always reads as
    one uninterrupted run.

    `sinks` (tracking.open_sinks: TensorBoard, wandb) receive every record written, as written."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, enabled: bool = True,
                 sinks: list | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.sinks = list(sinks or []) if enabled else []
        self._f = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            keep = [upgrade(r) for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: is this a run directory written by `aimv2 train --output`?")
    return [upgrade(r) for r in read_jsonl(p)]


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def summarize(records: list[dict], first: int = 10) -> dict:
    """Loss at the start (mean of the first `first` steps) and at the end (mean of the last `first`; at
    most half the steps each, so the two windows never overlap), and each loss term at the end
    (`<term>_end`, e.g. loss_img_end);
    throughput and MFU as totals over time (work done / time taken) for the steps after the first, which
    pays for warm-up and compilation."""
    if not records:
        return {}
    k = max(1, min(first, len(records) // 2))  # a short run still compares its start with its end
    steady = records[1:] or records
    mean = lambda key, rs: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    t = sum(r["step_time"] for r in steady)
    done = lambda key: sum(r[key] * r["step_time"] for r in steady)  # noqa: E731  rate x time = amount
    return {
        "loss_window": k, "loss_start": mean(TOTAL_LOSS, records[:k]), "loss_end": mean(TOTAL_LOSS, records[-k:]),
        **{f"{t}_end": mean(t, records[-k:]) for t in LOSS_TERMS if t in records[0]},
        "images_per_s": done("images_per_s") / t, "patches_per_s": done("patches_per_s") / t,
        "steps_per_s": len(steady) / t, "mfu": done("mfu") / t, "train_seconds": sum(r["step_time"] for r in records),
        **_last_val(records),
    }


def _last_val(records: list[dict]) -> dict:
    """The newest held-out losses (--val-manifest), as val_loss_end etc."""
    last = next((r for r in reversed(records) if "val_loss" in r), None)
    if last is None:
        return {}
    return {f"{k}_end": v for k, v in last.items() if k.startswith("val_loss")} | {"val_step": last["step"]}
