"""Fetch throughput on loopback: `aimv2 fetch` against stock img2dataset (same settings, its own
resizer) and against a bare threaded urllib download of the same urls, all in one run.

    .venv/bin/python benchmarks/bench_fetch.py [--images 400] [--processes 2] [--threads 32] [--repeat 2]

Images are the demo corpus (80 real and generated images, 5 MB) cycled under distinct paths and
served from memory by the loopback server, so the network is not the bottleneck: this measures
fetch's own overhead (process start, decode/re-encode decisions, tar writing). Also times the two
resizers alone, in process, over the corpus bytes.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import urllib.request
from multiprocessing.pool import ThreadPool
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402

from aimv2data import demo_corpus as demo  # noqa: E402
from aimv2data.fetch import FetchOptions, fetch  # noqa: E402
from aimv2data.fetch.summary import busy_seconds, read_stats  # noqa: E402
from aimv2data.serve import LoopbackServer  # noqa: E402


def stats_rate(out: Path) -> tuple[int, float]:
    stats = [read_stats(p) for p in sorted(out.glob("*_stats.json"))]
    n = sum(s["successes"] for s in stats)
    return n, n / busy_seconds([(s["start_time"], s["end_time"]) for s in stats])


def run_raw(urls, threads) -> float:
    def get(u):
        with urllib.request.urlopen(u, timeout=10) as r:
            return len(r.read())

    t0 = time.perf_counter()
    with ThreadPool(threads) as pool:
        total = sum(pool.map(get, urls))
    assert total > 0
    return time.perf_counter() - t0


def run_stock(url_list: Path, out: Path, a) -> float:
    from img2dataset import download

    t0 = time.perf_counter()
    download(url_list=str(url_list), input_format="parquet", output_folder=str(out), output_format="webdataset",
             url_col="url", caption_col="text", image_size=2048, resize_mode="keep_ratio_largest",
             resize_only_if_bigger=True, encode_format="jpg", encode_quality=95, skip_reencode=True,
             processes_count=a.processes, thread_count=a.threads, number_sample_per_shard=a.shard_size,
             enable_wandb=False, compute_hash="sha256", timeout=10)
    return time.perf_counter() - t0


def run_ours(url_list: Path, out: Path, a) -> float:
    t0 = time.perf_counter()
    fetch(FetchOptions(source="coyo", url_lists=[str(url_list)], output=str(out), processes=a.processes,
                       threads=a.threads, shard_size=a.shard_size, allow_private_addresses=True))  # loopback
    return time.perf_counter() - t0


def resizer_rates(repeat: int = 3) -> dict:
    """Images/s of each resizer alone, one thread, over the corpus bytes (best of `repeat`)."""
    from img2dataset.resizer import Resizer

    from aimv2data.fetch.resize import NativeResizer

    kw = dict(image_size=2048, resize_mode="keep_ratio_largest", resize_only_if_bigger=True, encode_format="jpg",
              encode_quality=95, skip_reencode=True)
    data = [im.data for im in demo.corpus()]
    rates = {}
    for name, r in (("img2dataset Resizer", Resizer(**kw)), ("aimv2 NativeResizer", NativeResizer(**kw))):
        best = 0.0
        for _ in range(repeat):
            t0 = time.perf_counter()
            for d in data:
                assert r(io.BytesIO(d))[5] is None
            best = max(best, len(data) / (time.perf_counter() - t0))
        rates[name] = best
    return rates


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each fetcher; the best is reported")
    a = ap.parse_args()

    corpus = demo.corpus()
    routes = {f"/img/{i:05d}/{corpus[i % len(corpus)].name}": corpus[i % len(corpus)].data for i in range(a.images)}
    mb = sum(len(v) for v in routes.values()) / 1e6
    results = {"images": a.images, "megabytes": round(mb, 1), "processes": a.processes, "threads": a.threads,
               "shard_size": a.shard_size, "cpus": os.cpu_count()}
    with LoopbackServer(routes=routes) as srv, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        urls = [srv.url(p) for p in routes]
        url_list = tmp / "list.parquet"
        pl.DataFrame({"id": range(len(urls)), "url": urls, "text": [p for p in routes],
                      "width": [0] * len(urls), "height": [0] * len(urls)}).write_parquet(url_list)
        rows = {"raw urllib download": [], "img2dataset (stock resizer)": [], "aimv2 fetch": []}
        for r in range(a.repeat):
            rows["raw urllib download"].append((run_raw(urls, a.processes * a.threads), a.images, None))
            for name, fn in (("img2dataset (stock resizer)", run_stock), ("aimv2 fetch", run_ours)):
                out = tmp / f"{name.split()[0]}_{r}"
                wall = fn(url_list, out, a)
                n, busy_rate = stats_rate(out)
                assert n == a.images, (name, n)
                rows[name].append((wall, n, busy_rate))
    print(f"{a.images} images ({mb:.1f} MB) on loopback, {a.processes} processes x {a.threads} threads, "
          f"shards of {a.shard_size}, {os.cpu_count()} CPUs; best of {a.repeat}")
    print(f"{'':30s} {'wall s':>8s} {'samples/s (wall)':>17s} {'samples/s (shard work)':>23s}")
    table = {}
    for name, runs in rows.items():
        wall, n, busy_rate = min(runs, key=lambda x: x[0])
        busy = f"{busy_rate:23.1f}" if busy_rate else f"{'-':>23s}"
        print(f"{name:30s} {wall:8.2f} {n / wall:17.1f} {busy}")
        table[name] = {"wall_s": round(wall, 3), "samples_per_s_wall": round(n / wall, 1),
                       "samples_per_s_shard_work": round(busy_rate, 1) if busy_rate else None}
    ours, stock = table["aimv2 fetch"], table["img2dataset (stock resizer)"]
    print(f"ratio aimv2 fetch / img2dataset: wall {stock['wall_s'] / ours['wall_s']:.2f}x, "
          f"shard work {ours['samples_per_s_shard_work'] / stock['samples_per_s_shard_work']:.2f}x")
    rates = resizer_rates()
    for k, v in rates.items():
        print(f"resizer alone, 1 thread: {k:22s} {v:8.1f} images/s")
    print(f"ratio NativeResizer / img2dataset Resizer: {rates['aimv2 NativeResizer'] / rates['img2dataset Resizer']:.2f}x")
    results.update(fetchers=table, resizers={k: round(v, 1) for k, v in rates.items()})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
