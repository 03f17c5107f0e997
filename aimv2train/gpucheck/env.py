"""The `env` and `peak` parts: what the machine is, and the best bf16 FLOP/s of one large matmul (beside MFU,
whose denominator is the trainer's train.metrics.reference_peak)."""
from __future__ import annotations

import os
import platform

import torch

from .common import Sizes, importable

# what the trainer part's path imports beyond torch (the GPU machine lacked some of them: docs/gpucheck.md)
MODULES = ("nvidia.dali", "polars", "pyarrow", "webdataset", "click", "sentencepiece", "tqdm")


def part_env(device: torch.device, sizes: Sizes, **_) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device), "cpu_count": os.cpu_count(),
            "cpus_in_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "sizes": sizes.__dict__}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    info["missing"] = {m: r for m in MODULES if (r := importable(m)) is not None}
    return info


def part_peak(device: torch.device, sizes: Sizes, ctx: dict, **_) -> dict:
    from ..train.metrics import matmul_peak

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 256
    peak = matmul_peak(device, dtype, n=n, min_time=0.5 if device.type == "cuda" else 0.05)
    ctx["peak"] = peak
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "tflops": peak / 1e12}
