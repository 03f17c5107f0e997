"""Encoder forward+backward time against transformers' Aimv2VisionModel of the same config and weights,
in the same run (ratio = ours / HF, lower is better), plus FLOPs per training step by formula, checked
against torch's FlopCounterMode.

    .venv/bin/python benchmarks/bench_model.py                  # the figures in benchmarks/RESULTS.md (Model section)
    .venv/bin/python benchmarks/bench_model.py --quick          # one small case, for a smoke test

Runs on CPU (no GPU here). The machine is shared, so repeats are interleaved (ours, HF, ours, HF, ...)
and each side reports its fastest wall time (least disturbed, as timeit advises) and its fastest process
CPU time (threads x busy time; insensitive to being descheduled). The ratio uses the fastest wall times.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimv2train.model.config import ENCODER_PRESETS, EncoderConfig, model_config  # noqa: E402
from aimv2train.model.flops import encoder_train_flops, step_flops  # noqa: E402
from aimv2train.model.interop import hf_config, to_hf_state_dict  # noqa: E402
from aimv2train.model.encoder import Encoder  # noqa: E402

CASES = {  # name: (encoder config, batch, (h, w) grid)
    "S-224 (384x6)": (EncoderConfig(dim=384, depth=6, heads=3), 8, (16, 16)),
    "B-224": (ENCODER_PRESETS["B"], 2, (16, 16)),
    "L-224": (ENCODER_PRESETS["L"], 1, (16, 16)),
    "S-native 12x20 (sincos)": (EncoderConfig(dim=384, depth=6, heads=3, pos_embed="sincos"), 8, (12, 20)),
}
QUICK = {"tiny-224": (EncoderConfig(dim=128, depth=2, heads=2), 2, (16, 16))}


def hf_twin(enc: Encoder):
    from transformers import Aimv2VisionConfig, Aimv2VisionModel

    cfg = {k: v for k, v in hf_config(enc.cfg).items() if k not in ("architectures", "dtype", "model_type")}
    hf = Aimv2VisionModel(Aimv2VisionConfig(**cfg))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(enc.state_dict(), enc.cfg.depth), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return hf.train()


def fwd_bwd(fn, x):
    t, c = time.perf_counter(), time.process_time()
    fn(x).float().pow(2).mean().backward()
    return time.perf_counter() - t, time.process_time() - c


def bench_case(name, cfg, batch, grid, repeats):
    torch.manual_seed(0)
    ours = Encoder(cfg).train()
    hf = hf_twin(ours)
    x = torch.randn(batch, 3, grid[0] * cfg.patch_size, grid[1] * cfg.patch_size)
    with torch.no_grad():
        diff = (ours(x) - hf(pixel_values=x).last_hidden_state).abs().max().item()
    run_ours = lambda x: ours(x)  # noqa: E731
    run_hf = lambda x: hf(pixel_values=x).last_hidden_state  # noqa: E731
    for f in (run_ours, run_hf):  # warm-up
        fwd_bwd(f, x)
    t_ours, t_hf = [], []
    for _ in range(repeats):
        ours.zero_grad(set_to_none=True)
        t_ours.append(fwd_bwd(run_ours, x))
        hf.zero_grad(set_to_none=True)
        t_hf.append(fwd_bwd(run_hf, x))
    mo, mh = min(w for w, _ in t_ours), min(w for w, _ in t_hf)
    co, ch = min(c for _, c in t_ours), min(c for _, c in t_hf)
    med = statistics.median(w for w, _ in t_ours) / statistics.median(w for w, _ in t_hf)
    flops = encoder_train_flops(cfg, grid, batch)
    return {"case": name, "batch": batch, "grid": f"{grid[0]}x{grid[1]}", "ours_s": mo, "hf_s": mh,
            "ratio": mo / mh, "cpu_ratio": co / ch, "median_ratio": med, "gflops": flops / 1e9,
            "ours_gflops_s": flops / mo / 1e9, "max_diff": diff}


def flop_counter_check():
    """Formula vs FlopCounterMode (math SDPA backend: the counter has no formula for the CPU kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from aimv2train.model.aimv2 import AIMv2

    cfg = model_config("tiny")
    model = AIMv2(cfg)
    x, tok = torch.randn(2, 3, 56, 70), torch.randint(3, 512, (2, 77))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss, _ = model.training_loss(x, None, tok, 0, prefix_len=torch.tensor([3, 9]))
        loss.backward()
    return fc.get_total_flops(), step_flops(cfg, (4, 5), 2, 77).train


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7, help="timed fwd+bwd per side and case")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: least sensitive to other jobs on a shared machine)")
    ap.add_argument("--quick", action="store_true", help="one tiny case, 2 repeats")
    ap.add_argument("--case", action="append", choices=list(CASES), help="run only these cases (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cases, repeats = (QUICK, 2) if args.quick else (CASES, args.repeats)
    if args.case:
        cases = {k: CASES[k] for k in args.case}
    print(f"machine: {machine()}; transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}")
    print("\n| case | batch | grid | ours fwd+bwd s | HF fwd+bwd s | ours/HF wall | ours/HF CPU | ours/HF median "
          "| GFLOP/step | ours GFLOP/s | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (cfg, batch, grid) in cases.items():
        r = bench_case(name, cfg, batch, grid, repeats)
        print(f"| {r['case']} | {r['batch']} | {r['grid']} | {r['ours_s']:.3f} | {r['hf_s']:.3f} | "
              f"{r['ratio']:.2f}x | {r['cpu_ratio']:.2f}x | {r['median_ratio']:.2f}x | {r['gflops']:.1f} | "
              f"{r['ours_gflops_s']:.1f} | {r['max_diff']:.1e} |",
              flush=True)

    counted, formula = flop_counter_check()
    print(f"\nFLOP counter vs formula, tiny model train step (B=2, 4x5 grid, 77 tokens): "
          f"counted {counted:,} formula {formula:,} ({counted / formula - 1:+.2%})")
    print("\nTraining-step FLOPs by formula (per image, 77-token caption, fwd+bwd; decoder 12x1024, vocab 32000):")
    print("| size | grid | encoder fwd GFLOP | decoder fwd GFLOP | heads fwd GFLOP | train step GFLOP |")
    print("|---|---|---|---|---|---|")
    for size in ("L", "H", "1B", "3B"):
        for grid in ((16, 16), (32, 32)):
            f = step_flops(model_config(size, vocab_size=32000), grid, 1, 77)
            print(f"| {size} | {grid[0]}x{grid[1]} | {f.encoder / 1e9:.1f} | {f.decoder / 1e9:.1f} | "
                  f"{f.heads / 1e9:.1f} | {f.train / 1e9:.1f} |")


if __name__ == "__main__":
    main()
