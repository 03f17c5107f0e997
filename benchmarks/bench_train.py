"""Training-step throughput and MFU of the AIMv2 trainer's step, per model size, on this machine.

    .venv/bin/python benchmarks/bench_train.py                       # tiny and base, CPU fp32
    .venv/bin/python benchmarks/bench_train.py --device cuda          # the same on a GPU, bf16 autocast
    .venv/bin/python benchmarks/bench_train.py --models tiny --manifest M --tokenizer T   # + the real loader

What one step is: the trainer's own LossModule (prefix lengths, L_text + alpha L_img) forward and
backward, gradient clipping and DecoupledAdamW, on batches already in memory; `--manifest` adds the
same with the real loader feeding it (end-to-end, decode included).
Baselines measured in the same run:
  - MFU's denominator: the best FLOP/s of one large matmul on the same device and dtype (metrics.matmul_peak),
    measured before the run and again after each model's steps, the best kept;
  - the optimiser: our DecoupledAdamW step against torch.optim.AdamW(foreach=True) on the same model (ratio).
Prints a markdown table (paste into the Trainer section of benchmarks/RESULTS.md) and, with --json, one JSON object per row.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimv2train.model.config import model_config  # noqa: E402
from aimv2train.model.flops import step_flops  # noqa: E402
from aimv2train.model.masks import sample_prefix_lengths  # noqa: E402
from aimv2train.train.metrics import matmul_peak, read_metrics  # noqa: E402
from aimv2train.model.aimv2 import AIMv2, count_params  # noqa: E402
from aimv2train.train.optim import build_optimizer  # noqa: E402
from aimv2train.train.trainer import LossModule, autocast_context  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_step(size: str, res: int, batch: int, device: torch.device, precision: str, steps: int, warmup: int,
               peak: float, vocab: int = 32000, compile_: bool = False, opt_reps: int = 10) -> dict:
    torch.manual_seed(0)
    cfg = model_config(size, vocab_size=vocab, img_size=res)
    model = AIMv2(cfg).to(device)
    step_fn = LossModule(model, pad_id=0)
    if compile_:
        step_fn = torch.compile(step_fn)
    opt = build_optimizer(model, 1e-4, 1e-4)
    g = torch.Generator().manual_seed(0)
    p = cfg.encoder.patch_size
    grid = (res // p, res // p)
    images = torch.randn(batch, 3, res, res, generator=g).to(device)
    patches = images.reshape(batch, 3, grid[0], p, grid[1], p).permute(0, 2, 4, 3, 5, 1).reshape(
        batch, grid[0] * grid[1], -1).contiguous()
    tokens = torch.randint(1, vocab, (batch, 77), generator=g).to(device)
    params = [q for q in model.parameters()]
    times, opt_times = [], []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        prefix = sample_prefix_lengths(batch, grid[0] * grid[1], g)
        with autocast_context(device, precision):
            loss = step_fn(images, patches, tokens, prefix)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=False)  # keep grads allocated so the optimiser baseline below can reuse them
        if i >= warmup:
            times.append(t2 - t0)
            opt_times.append(t2 - t1)
    # baseline for the optimiser: torch's AdamW (foreach) on the same parameters and gradients
    ref = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, foreach=True)
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    ours = build_optimizer(model, 1e-4, 1e-4)
    ref_t, ours_t = [], []
    for i in range(1 + opt_reps):
        for o, acc in ((ref, ref_t), (ours, ours_t)):
            sync(device)
            t0 = time.perf_counter()
            o.step()
            sync(device)
            if i >= 1:
                acc.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]  # median
    # the CPU may be shared: re-measure the matmul peak right after the steps and keep the best (a
    # conservative MFU: contention that slowed the steps is not allowed to lower the denominator)
    peak = max(peak, matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32))
    flops = step_flops(cfg, grid, batch, 77).train
    return {
        "model": size, "params_M": round(count_params(model) / 1e6, 1), "device": device.type, "precision": precision,
        "resolution": res, "batch": batch, "steps_per_s": 1 / dt, "images_per_s": batch / dt,
        "patches_per_s": batch * grid[0] * grid[1] / dt, "tflop_per_step": flops / 1e12,
        "achieved_gflops": flops / dt / 1e9, "peak_gflops": peak / 1e9, "mfu": flops / dt / peak,
        "optimizer_share": sorted(opt_times)[len(opt_times) // 2] / dt,
        "adamw_ratio": sorted(ours_t)[len(ours_t) // 2] / sorted(ref_t)[len(ref_t) // 2],
    }


def bench_loader(size, res, batch, device, precision, steps, peak, manifest, tokenizer, workers, out) -> dict:
    """The trainer end to end (real loader, metrics, no checkpoints) for `steps` steps."""
    from aimv2train.train.trainer import TrainConfig, train

    s = train(TrainConfig(manifest=manifest, tokenizer=tokenizer, out=out, model=size, steps=steps, resolution=res,
                          batch_size=batch, device=str(device), precision=precision, workers=workers,
                          save_every=0, progress=False, peak_flops=peak))
    recs = read_metrics(out)[2:]
    data = sum(r["data_time"] for r in recs) / sum(r["step_time"] for r in recs)
    return {"model": size + " (trainer + loader)", "device": device.type, "precision": precision, "resolution": res,
            "batch": batch, "steps_per_s": s["steps_per_s"], "images_per_s": s["images_per_s"], "mfu": s["mfu"],
            "data_wait_share": data}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,base", help="comma-separated size presets")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--resolution", type=int, default=None, help="default: 224 on GPU; tiny 112, base 112 on CPU")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on GPU; tiny 32, base 4 on CPU")
    ap.add_argument("--vocab", type=int, default=32000, help="text vocabulary (SigLIP's 32000 by default)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--manifest", help="also time the trainer with the real loader on this manifest")
    ap.add_argument("--tokenizer")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = torch.device(a.device)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype)
    where = torch.cuda.get_device_name(device) if gpu else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"# bench_train: {where}; torch {torch.__version__}; matmul peak {peak / 1e9:.0f} GFLOP/s ({precision}); "
          f"vocab {a.vocab}; {time.strftime('%Y-%m-%d')}")
    rows = []
    for size in a.models.split(","):
        res = a.resolution or (224 if gpu else 112)
        batch = a.batch or (64 if gpu else (32 if size == "tiny" else 4))
        rows.append(bench_step(size, res, batch, device, precision, a.steps, a.warmup, peak, a.vocab, a.compile))
        if a.manifest:
            import tempfile
            with tempfile.TemporaryDirectory() as out:
                rows.append(bench_loader(size, res, batch, device, precision, a.steps + 2, peak, a.manifest,
                                         a.tokenizer, a.workers, out))
    print("\n| model | params | device | res | batch | steps/s | images/s | achieved / peak GFLOP/s | MFU | "
          "optimiser share | DecoupledAdamW / torch AdamW |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r.get('params_M', '')}M | {r['device']} {r['precision']} | {r['resolution']} | "
              f"{r['batch']} | {r['steps_per_s']:.3f} | {r['images_per_s']:.1f} | "
              f"{r['achieved_gflops']:.1f} / {r['peak_gflops']:.0f} | {100 * r['mfu']:.1f}% | "
              f"{100 * r['optimizer_share']:.1f}% | {r['adamw_ratio']:.2f}x |" if "adamw_ratio" in r else
              f"| {r['model']} | | {r['device']} {r['precision']} | {r['resolution']} | {r['batch']} | "
              f"{r['steps_per_s']:.3f} | {r['images_per_s']:.1f} | | {100 * r['mfu']:.1f}% | data wait "
              f"{100 * r['data_wait_share']:.0f}% | |")
    if a.json:
        for r in rows:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
