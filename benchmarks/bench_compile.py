"""Native-resolution compile cost: graphs compiled, compile seconds and recompiles of the old whole-model compile
(one static graph per grid, what `--compile --native-res` did on CUDA; or one dynamic graph, its CPU choice)
against the per-block dynamic compile that replaced it (train/compiling.py), over fresh batches of many grids
(token counts), each with new prefix lengths.

    .venv/bin/python benchmarks/bench_compile.py                        # the figures in benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_compile.py --steps 4 --modes eager,blocks-dynamic   # a quick look

Each mode runs in a fresh process with an empty Inductor cache folder (no cache hits from earlier runs or
modes: what a fresh node pays). The model is the tiny preset with sin-cos positions, SDPA attention (the CPU
path: FlexAttention has no backward on CPU), fp32; the step is the trainer's LossModule forward + backward on
uint8 batches (optimiser excluded: it is not compiled). Grids come from the default 33-bucket table at
CPU-sized areas with B = C / A; every step draws a grid not seen before.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("eager", "model-static", "model-dynamic", "blocks-dynamic")
AREAS = (32, 64, 128, 256)


def shapes(steps: int, c: int) -> list[tuple[tuple[int, int], int]]:
    """`steps` distinct (grid, B): areas in turn, buckets spread over the table."""
    from aimv2data.buckets import DEFAULT

    out, seen, i = [], set(), 0
    while len(out) < steps:
        area, bucket = AREAS[i % len(AREAS)], (i * 7) % 33
        grid = DEFAULT.grid(bucket, area)
        if grid not in seen:
            seen.add(grid)
            out.append((grid, c // area))
        i += 1
    return out


def run_mode(mode: str, steps: int, c: int, threads: int) -> dict:
    """One mode in this process: the step over `shapes`, with the compile figures after each step."""
    import torch

    sys.path.insert(0, str(ROOT))
    from aimv2train.model.aimv2 import AIMv2
    from aimv2train.model.config import model_config
    from aimv2train.train.compiling import compile_counts, compile_step, watch_compiles
    from aimv2train.train.trainer import LossModule

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AIMv2(model_config("tiny", pos_embed="sincos"))
    model.set_attention("sdpa")
    loss_module = LossModule(model, pad_id=0)
    plan = shapes(steps, c)
    watch_compiles()
    if mode == "model-static":  # the old CUDA default: one static graph per grid, limit raised to the grids
        torch._dynamo.config.recompile_limit = len(plan) + 1
        step_fn = torch.compile(loss_module, dynamic=False)
    elif mode == "model-dynamic":  # the old CPU default
        step_fn = torch.compile(loss_module, dynamic=True)
    elif mode == "blocks-dynamic":
        step_fn = compile_step(loss_module, model, native=True, choice="auto", shapes=plan)
    else:
        step_fn = loss_module
    g = torch.Generator().manual_seed(0)
    rows = []
    for grid, B in plan:
        h, w = grid
        images = torch.randint(0, 256, (B, h * 14, w * 14, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
        tokens = torch.randint(3, 512, (B, 77), generator=g)
        prefix = torch.randint(1, h * w, (B,), generator=g)
        t0 = time.perf_counter()
        step_fn(images, None, tokens, prefix)["loss"].backward()
        model.zero_grad(set_to_none=True)
        rows.append({"grid": list(grid), "B": B, "tokens": h * w, "step_s": round(time.perf_counter() - t0, 3),
                     **{f"{k}_so_far": v for k, v in compile_counts().items()}})
    counts = compile_counts()
    return {"mode": mode, "steps": len(plan), "distinct_grids": len({tuple(r["grid"]) for r in rows}),
            "graphs": counts["graphs"], "recompiles": counts["recompiles"],
            "compile_seconds": round(counts["seconds"], 1), "wall_seconds": round(sum(r["step_s"] for r in rows), 1),
            "graphs_after_half": counts["graphs"] - rows[len(rows) // 2 - 1]["graphs_so_far"],
            "median_step_s_last_half": statistics.median(r["step_s"] for r in rows[len(rows) // 2:]),
            "per_step": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="steps, each a new grid")
    ap.add_argument("--batch-patches", type=int, default=512, help="C; B = C / A (areas 32..256)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(run_mode(a.child, a.steps, a.batch_patches, a.threads)))
        return
    results = []
    for mode in a.modes.split(","):
        with tempfile.TemporaryDirectory() as cache:  # an empty Inductor cache: every compile is paid
            # compile in this process (no worker pool), so its CPU time is the child's
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "OMP_NUM_THREADS": str(a.threads),
                   "TORCHINDUCTOR_COMPILE_THREADS": "1"}
            t0, cpu0 = time.perf_counter(), _children_cpu()
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(a.steps),
                                  "--batch-patches", str(a.batch_patches), "--threads", str(a.threads)],
                                 env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                results.append({"mode": mode, "error": out.stderr.strip().splitlines()[-1:]})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["process_seconds"] = round(time.perf_counter() - t0, 1)
            r["process_cpu_seconds"] = round(_children_cpu() - cpu0, 1)  # user + sys: less sensitive to load
            results.append(r)
        print(_row(results[-1]), flush=True)
    import torch

    report = {"machine": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "python": platform.python_version(), "torch": torch.__version__, "threads": a.threads,
              "steps": a.steps, "batch_patches": a.batch_patches, "results": results}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['mode']:15s} failed: {r['error']}"
    return (f"{r['mode']:15s} {r['distinct_grids']} grids: {r['graphs']} graphs ({r['graphs_after_half']} in the "
            f"second half), {r['recompiles']} recompiles, {r['compile_seconds']:.1f} s compiling, "
            f"{r['wall_seconds']:.1f} s of steps, median step {r['median_step_s_last_half']:.3f} s (second half); "
            f"process {r['process_seconds']:.0f} s wall, {r['process_cpu_seconds']:.0f} s CPU")


if __name__ == "__main__":
    main()
