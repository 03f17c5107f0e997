"""The `dali` loader's wait per step with a slow consumer: synchronous vs decode-ahead (issue 15, point 2).

    taskset -c 1 .venv/bin/python benchmarks/bench_dali_ahead.py [--images 256 --steps 12]

A "trainer" that spends `--train-ms` per step (time.sleep: the GPU is busy, the CPU free; default 1.5x
the measured decode time of a step) pulls batches from `Loader(decoder="dali")` on the CPU (DALI,
device_id=None, 1 thread). Wait per step = time spent inside `next(loader)`. Synchronous: every step
waits for its whole decode. Decode-ahead: the next steps are decoded during the sleep, so the wait
falls to the hand-over. Both runs also check that they produced the same batches.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def waits(manifest, train_s: float, steps: int, ahead: bool, **kw):
    import torch

    from aimv2data.loader import Loader

    loader = Loader(manifest, decoder="dali", dali_ahead=ahead, dali_device=None, **kw)
    it = iter(loader)
    next(it)                                  # untimed: builds the pipeline
    out, batches = [], []
    t_all = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        b = next(it)
        out.append(time.perf_counter() - t)
        batches.append((b.keys, torch.clone(b.images)))
        time.sleep(train_s)                   # the training step
    total = time.perf_counter() - t_all
    it.close()
    return out, total, batches


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "aimv2-bench-dali-ahead"))
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--train-ms", type=float, default=None, help="Consumer time per step (default 1.5x decode).")
    a = ap.parse_args()
    import torch

    from _loader_fixtures import build_manifest

    torch.set_num_threads(1)
    work = Path(a.work)
    man = work / "manifest"
    if not (man / "_manifest.json").is_file():
        build_manifest(work, n=a.images, seed=7, photo=True, min_side=400, max_side=1000,
                       aspects=[2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2], exif_every=8)
    kw = dict(resolution=224, batch_size=a.batch_size, seed=0)
    steps = min(a.steps, a.images // a.batch_size - 1)
    dec, _, _ = waits(man, 0.0, steps, False, **kw)
    decode_s = statistics.median(dec)
    train_s = a.train_ms / 1e3 if a.train_ms else 1.5 * decode_s
    sync, t_sync, b_sync = waits(man, train_s, steps, False, **kw)
    fast, t_fast, b_fast = waits(man, train_s, steps, True, **kw)
    same = all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(b_sync, b_fast))

    def ms(xs):
        xs = sorted(xs)
        return f"{1e3 * statistics.median(xs):.1f} ms (p90 {1e3 * xs[int(0.9 * (len(xs) - 1))]:.1f})"

    print(f"Date {datetime.date.today()}; {os.cpu_count()} cores, affinity {sorted(os.sched_getaffinity(0))}; "
          f"batch {a.batch_size} at 224 px, {steps} timed steps, DALI CPU 1 thread; decode per step "
          f"{1e3 * decode_s:.1f} ms, consumer {1e3 * train_s:.1f} ms per step")
    print("| path | wait per step (median, p90) | wall per step |")
    print("|---|---:|---:|")
    print(f"| synchronous (`dali_ahead=False`) | {ms(sync)} | {1e3 * t_sync / steps:.1f} ms |")
    print(f"| decode-ahead (default) | {ms(fast)} | {1e3 * t_fast / steps:.1f} ms |")
    print(f"identical batches: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
