"""CPU thread hygiene: the demo-sized trainer step (tiny model, 56 px, batch 16, 16-token captions,
forward + backward + DecoupledAdamW) alone and beside one busy process (`yes > /dev/null`) pinned to
the same cores, under torch's default thread count ("old") and the trainer's policy ("new":
distributed.cpu_threads, affinity // local ranks), plus the documented alternatives (1 thread,
OMP_WAIT_POLICY=PASSIVE) and two ranks sharing the machine.

    .venv/bin/python benchmarks/bench_threads.py [--cores 0,1] [--steps 80]

`--nice -15` (as root) lifts the measured processes above other users' jobs on a shared machine; with
the kernel's autogroup scheduling (sessions share the CPU as groups) it must be the autogroup's niceness:
`echo -15 > /proc/self/autogroup` in the shell that starts the benchmark.
Each configuration runs in a fresh process (OpenMP reads its environment once, at start-up), pinned
with taskset to --cores; the busy process is pinned to the same cores. Prints a markdown table of the
median and p90 step time (ms) and each case's ratio to the same policy alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(policy: str, steps: int, warmup: int) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from aimv2train.model.aimv2 import AIMv2
    from aimv2train.model.config import model_config
    from aimv2train.model.masks import sample_prefix_lengths
    from aimv2train.train.distributed import cpu_threads
    from aimv2train.train.optim import build_optimizer

    if policy == "new":
        cpu_threads(None)
    elif policy.startswith("t"):
        cpu_threads(int(policy[1:]))
    torch.manual_seed(0)
    model = AIMv2(model_config("tiny", vocab_size=256, img_size=56))
    opt = build_optimizer(model, 1e-3, 1e-4)
    g = torch.Generator().manual_seed(0)
    images, tokens = torch.randn(16, 3, 56, 56), torch.randint(1, 256, (16, 16))
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss, _ = model.training_loss(images, None, tokens, 0, prefix_len=sample_prefix_lengths(16, 16, g))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"threads": torch.get_num_threads(), "median_ms": 1e3 * statistics.median(times),
            "p90_ms": 1e3 * times[int(0.9 * len(times))]}


def run_case(cores: str, env: dict, policy: str, steps: int, ranks: int, busy: bool, nice: int | None) -> list[dict]:
    pre = ["nice", "-n", str(nice)] if nice is not None else []  # within this session's autogroup
    hog = subprocess.Popen([*pre, "taskset", "-c", cores, "yes"], stdout=subprocess.DEVNULL) if busy else None
    try:
        procs = []
        for _r in range(ranks):
            e = {**os.environ, **env, "LOCAL_WORLD_SIZE": str(ranks)}
            procs.append(subprocess.Popen([*pre, "taskset", "-c", cores, sys.executable, __file__, "--child", policy,
                                           "--steps", str(steps)], env=e, stdout=subprocess.PIPE, text=True))
        return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    finally:
        if hog is not None:
            hog.terminate()  # the one process this benchmark started
            hog.wait()


CASES = [  # (label, policy, extra env, ranks)
    ("old: torch default", "old", {}, 1),
    ("new: affinity // local ranks", "new", {}, 1),
    ("1 thread (--torch-threads 1)", "t1", {}, 1),
    ("new + OMP_WAIT_POLICY=PASSIVE", "new", {"OMP_WAIT_POLICY": "PASSIVE"}, 1),
    ("2 ranks, old (each torch default)", "old", {}, 2),
    ("2 ranks, new (each affinity // 2)", "new", {}, 2),
    ("2 ranks, new + OMP_WAIT_POLICY=PASSIVE", "new", {"OMP_WAIT_POLICY": "PASSIVE"}, 2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", default=",".join(str(c) for c in sorted(os.sched_getaffinity(0))))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--nice", type=int, default=None,
                    help="run the step and the busy process at this niceness (e.g. -15, as root) so that other "
                    "users' jobs on a shared machine barely disturb the comparison")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps, a.warmup)))
        return
    for v in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE"):
        os.environ.pop(v, None)
    rows = []
    print(f"cores {a.cores}; {a.steps} timed steps; nice {a.nice}; load average before: {os.getloadavg()}",
          file=sys.stderr)
    print("| case | threads/rank | alone: median (p90) ms | beside `yes`: median (p90) ms | beside / alone |")
    print("|---|---|---|---|---|")
    for label, policy, env, ranks in CASES:
        alone = run_case(a.cores, env, policy, a.steps, ranks, busy=False, nice=a.nice)
        busy = run_case(a.cores, env, policy, a.steps, ranks, busy=True, nice=a.nice)
        med = lambda rs, k: max(r[k] for r in rs)  # noqa: E731  (the slower rank sets the pace)
        row = {"case": label, "threads": alone[0]["threads"], "alone_ms": med(alone, "median_ms"),
               "alone_p90_ms": med(alone, "p90_ms"), "busy_ms": med(busy, "median_ms"),
               "busy_p90_ms": med(busy, "p90_ms")}
        rows.append(row)
        print(f"| {label} | {row['threads']} | {row['alone_ms']:.1f} ({row['alone_p90_ms']:.1f}) | "
              f"{row['busy_ms']:.1f} ({row['busy_p90_ms']:.1f}) | {row['busy_ms'] / row['alone_ms']:.2f}x |", flush=True)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
