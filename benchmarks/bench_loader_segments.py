"""The stall at a loader segment boundary (issue 21 point 6): new workers and a share read at every
boundary (the path before) against one persistent worker pool with the next share read ahead.

    taskset -c 1 .venv/bin/python benchmarks/bench_loader_segments.py [--tars 64 --rows 256 --segments 4]

A "trainer" spends `--train-ms` per step (time.sleep: the GPU is busy, the CPU free) pulling fixed-
resolution batches from `Loader(decoder="pil", workers=W)` as rank 0 of 2, so every segment (a new epoch
of the one stream) is another share that must be read. Wait per step = time inside `next()`; the stall is
the wait of a segment's first batch. The corpus is `--tars` hard links of one real tar of `--rows` small
JPEGs with a parquet row group per tar, as `aimv2 shard` writes them: many rows, cheap to decode. Runs
alternate old and new; figures are medians over runs and boundaries; both paths must give the same
batches. Pin the process (taskset) and keep torch at one thread, as the other loader benchmarks do.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

OLD = dict(persistent_workers=False, read_ahead=False)
NEW = dict(persistent_workers=True, read_ahead=True)


def corpus(work: Path, tars: int, rows: int) -> Path:
    """One real tar + manifest, then `tars` hard links of it, one parquet row group each; returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from _loader_fixtures import build_manifest

    man = work / f"x{tars}-{rows}" / "manifest"
    if (man / "_manifest.json").is_file():
        return man
    base = build_manifest(work / f"base-{rows}", n=rows, seed=3, shards=1, min_side=32, max_side=64,
                          aspects=[1.0], sources=("dfn",))
    one = pq.read_table(next((base / "samples").glob("*.parquet")))
    tar = (base / one.column("shard")[0].as_py()).resolve()
    (man / "samples").mkdir(parents=True, exist_ok=True)
    copies = []
    for k in range(tars):
        link = man.parent / "tars" / f"{k:05d}.tar"
        link.parent.mkdir(exist_ok=True)
        if not link.exists():
            os.link(tar, link)
        copies.append(one.set_column(one.schema.get_field_index("shard"), "shard",
                                     pa.array([f"../tars/{link.name}"] * one.num_rows)))
    pq.write_table(pa.concat_tables(copies), man / "samples" / "part-0.parquet", row_group_size=rows)
    meta = json.loads((base / "_manifest.json").read_text())
    meta.get("counts", {}).pop("sources", None)
    (man / "_manifest.json").write_text(json.dumps(meta))
    return man


def run(manifest, paths: dict, segments: int, train_s: float, **kw):
    import torch

    from aimv2data.loader import Loader

    with Loader(manifest, **paths, **kw) as loader:
        first, inner, batches = [], [], []
        t_all = time.perf_counter()
        for seg in range(segments + 1):       # segment 0's first batch starts the workers on both paths
            it = iter(loader)
            for i in range(len(loader)):
                t = time.perf_counter()
                b = next(it)
                (first if seg and i == 0 else inner).append(time.perf_counter() - t)
                batches.append((b.global_step, b.keys, torch.clone(b.images)))
                time.sleep(train_s)           # the training step
            assert next(it, None) is None
        total = time.perf_counter() - t_all
    return first, inner, total, batches


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "aimv2-bench-segments"))
    ap.add_argument("--tars", type=int, default=64)
    ap.add_argument("--rows", type=int, default=256, help="rows per tar (= per row group)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--segments", type=int, default=4, help="boundaries measured per run")
    ap.add_argument("--train-ms", type=float, default=30.0)
    ap.add_argument("--runs", type=int, default=3, help="runs per path, alternating")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    manifest = corpus(Path(a.work), a.tars, a.rows)
    kw = dict(resolution=28, batch_size=a.batch_size, workers=a.workers, seed=5, rank=0, world_size=2, mix="rows")
    res = {"old": [], "new": []}
    ref = None
    for _ in range(a.runs):
        for name, paths in (("old", OLD), ("new", NEW)):
            first, inner, total, batches = run(manifest, paths, a.segments, a.train_ms / 1e3, **kw)
            if ref is None:
                ref = batches
            assert len(batches) == len(ref) and all(x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2])
                                                    for x, y in zip(batches, ref)), "the paths' batches differ"
            res[name].append((first, inner, total))
    rows = {}
    for name, runs in res.items():
        stalls = [w for first, _, _ in runs for w in first]
        inner = [w for _, inn, _ in runs for w in inn]
        rows[name] = {"stall_ms": 1e3 * statistics.median(stalls), "stall_max_ms": 1e3 * max(stalls),
                      "wait_ms": 1e3 * statistics.median(inner), "run_s": statistics.median(t for *_, t in runs)}
    print(f"# bench_loader_segments {datetime.date.today()} · {platform.processor() or platform.machine()} · "
          f"CPUs {sorted(os.sched_getaffinity(0))} · torch threads {torch.get_num_threads()} · "
          f"{a.tars} row groups x {a.rows} rows, rank 0 of 2, batch {a.batch_size}, {a.workers} workers, "
          f"train step {a.train_ms} ms, {a.segments} boundaries x {a.runs} runs per path")
    print("| path | stall at a boundary (median) | (max) | wait inside a segment (median) | run |")
    print("|---|---|---|---|---|")
    for name, label in (("old", "new workers + share read at the boundary (before)"),
                        ("new", "persistent pool + share read ahead")):
        r = rows[name]
        print(f"| {label} | {r['stall_ms']:.1f} ms | {r['stall_max_ms']:.1f} ms | {r['wait_ms']:.2f} ms | "
              f"{r['run_s']:.2f} s |")
    print(f"stall ratio new / old: {rows['new']['stall_ms'] / rows['old']['stall_ms']:.3f}")


if __name__ == "__main__":
    main()
