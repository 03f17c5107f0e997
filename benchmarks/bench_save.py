"""How long a training checkpoint takes to write at the paper's sizes, extrapolated from a measured fraction.

    .venv/bin/python benchmarks/bench_save.py                        # L, 1/8 of its state, in a temp dir
    .venv/bin/python benchmarks/bench_save.py --model 3B --fraction 0.02 --dir /shared/scratch

What is written is what `save_checkpoint` writes for a DDP run: the model's fp32 weights plus the AdamW state
(exp_avg, exp_avg_sq per parameter), i.e. 12 bytes per parameter, with the real model's tensor shapes (the
first tensors of the preset, built on the meta device, up to `--fraction` of its parameters). Three writers:
  - torch.save through atomic_torch_save (the trainer's writer; returns once the bytes are in the page cache),
  - the same followed by fsync (the bytes on the device: what a save costs when the page cache is full, or on
    a network filesystem that flushes on close),
  - torch.distributed.checkpoint.save (DCP, one process: what FSDP's sharded save does per rank).
Each is timed `--repeat` times (the best kept) and extrapolated linearly to the whole preset (bandwidth-bound:
the time per byte is flat across fractions, see benchmarks/RESULTS.md). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimv2data.atomic import atomic_torch_save  # noqa: E402
from aimv2train.model.aimv2 import AIMv2  # noqa: E402
from aimv2train.model.config import model_config  # noqa: E402

BYTES_PER_PARAM = 12  # fp32 weight + AdamW exp_avg + exp_avg_sq


def preset_shapes(size: str) -> list[torch.Size]:
    with torch.device("meta"):
        model = AIMv2(model_config(size, vocab_size=32000))
    return [p.shape for p in model.parameters()]


def payload(shapes: list[torch.Size], fraction: float) -> tuple[dict, int]:
    """A checkpoint-shaped dict holding the first tensors of the preset up to `fraction` of its parameters."""
    total, budget = sum(s.numel() for s in shapes), 0
    model, state = {}, {}
    for i, s in enumerate(shapes):
        if budget >= fraction * total:
            break
        model[f"p{i}"] = torch.randn(s)
        state[i] = {"step": torch.tensor(1000.0), "exp_avg": torch.randn(s), "exp_avg_sq": torch.rand(s)}
        budget += s.numel()
    return {"model": model, "optimizer": {"state": state, "param_groups": []}, "step": 1000}, budget


def timed(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def fsync_tree(path: Path) -> None:
    for f in ([path] if path.is_file() else sorted(path.rglob("*"))):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="L", help="size preset to extrapolate to (tiny, B, L, H, 1B, 3B)")
    ap.add_argument("--fraction", type=float, default=0.125, help="share of the preset's parameters written")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir); the filesystem measured")
    ap.add_argument("--repeat", type=int, default=3, help="timings per writer, the best kept")
    args = ap.parse_args()
    import torch.distributed.checkpoint as dcp

    shapes = preset_shapes(args.model)
    total = sum(s.numel() for s in shapes)
    obj, n = payload(shapes, args.fraction)
    gb = n * BYTES_PER_PARAM / 1e9
    root = Path(tempfile.mkdtemp(prefix="bench_save_", dir=args.dir))
    try:
        pt, d = root / "step.pt", root / "step.dcp"

        def dcp_save():
            shutil.rmtree(d, ignore_errors=True)
            dcp.save({"model": obj["model"], "optimizer": obj["optimizer"]["state"]}, checkpoint_id=str(d))

        atomic_torch_save(obj, pt)  # warm-up: the first write into a fresh directory was slower on every run
        rows = [("torch.save (atomic_torch_save)", timed(lambda: atomic_torch_save(obj, pt), args.repeat)),
                ("torch.save + fsync", timed(lambda: (atomic_torch_save(obj, pt), fsync_tree(pt)), args.repeat)),
                ("DCP save, 1 process", timed(dcp_save, args.repeat))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    scale = total / n
    print(f"{args.model}: {total / 1e6:.0f}M params incl. decoder, {total * BYTES_PER_PARAM / 1e9:.1f} GB of weights + "
          f"AdamW state; measured {n / 1e6:.0f}M params ({gb:.2f} GB); {platform.node()}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, {time.strftime('%Y-%m-%d')}")
    print(f"| writer | measured {gb:.2f} GB | GB/s | extrapolated to {args.model} |\n|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} s | {gb / t:.2f} | {t * scale:.1f} s |")


if __name__ == "__main__":
    main()
