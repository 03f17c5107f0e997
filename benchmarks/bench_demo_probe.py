"""How robust `make demo`'s probe result is: the demo's stage-1 trunk retrained with other seeds, and
random-init trunks with other seeds, all probed exactly as the demo's `probe` step does (same held-out
pattern set, same sweep). Needs a finished demo output (its manifest, tokenizer and probe set).

    .venv/bin/python benchmarks/bench_demo_probe.py [--demo demo_out] [--train-seeds 1 2] [--random-seeds 0 1 2]

Writes DEMO/probe_seeds/<name>/ and prints a table plus, as the last line, the results as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aimv2train.demo_pipeline import TRAIN_FIXED, probe_trunk, random_trunk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo", default="demo_out", help="a finished `aimv2 demo -o` directory")
    ap.add_argument("--train-seeds", type=int, nargs="*", default=[1, 2],
                    help="seeds for retraining the demo's train_fixed (seed 0 is the demo's own run)")
    ap.add_argument("--random-seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of random-init trunks")
    args = ap.parse_args()

    from aimv2train.train.trainer import TrainConfig, train

    demo = Path(args.demo)
    patterns = demo / "probe" / "patterns"
    if not (demo / "probe" / "summary.json").is_file():
        sys.exit(f"{demo}: no finished demo there (probe/summary.json missing); run `aimv2 demo -o {demo}` first")
    out = demo / "probe_seeds"
    trunks = {"train_fixed seed 0 (the demo)": demo / "train_fixed"}
    for s in args.train_seeds:
        run = out / f"train_fixed_seed{s}"
        if not (run / "summary.json").is_file():
            train(TrainConfig(manifest=str(demo / "manifest"), tokenizer=str(demo / "tok.model"), out=str(run),
                              model="tiny", workers=1, seed=s, progress=False, save_every=0,
                              resume=(run / "checkpoints").is_dir(), **TRAIN_FIXED))
        trunks[f"train_fixed seed {s}"] = run
    for s in args.random_seeds:
        trunks[f"random init seed {s}"] = random_trunk(out / f"random_seed{s}.pt", TRAIN_FIXED["resolution"], seed=s)

    results = {}
    for name, ckpt in trunks.items():
        dest = out / (name.replace(" ", "_").replace("(", "").replace(")", "") + "_probe.json")
        r = probe_trunk(ckpt, patterns / "train", patterns / "val", out / "cache", dest)
        results[name] = {"attentive_top1": r["attentive_top1"], "linear_top1": r["linear_top1"]}
        print(f"{name:32s} attentive {r['attentive_top1']:5.1f}%  linear {r['linear_top1']:5.1f}%", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
