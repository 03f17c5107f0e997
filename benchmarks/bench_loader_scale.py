"""The loader at DFN scale (issue 13): rank 0's start-up, peak memory and bytes per served row at W = 1, 8, 64.

    python benchmarks/bench_loader_scale.py --rows 10000000 --parts 100 --out /tmp/scale   # writes, measures, deletes
    python benchmarks/bench_loader_scale.py ... --keep          # then --keep --reuse measures the same manifest again

Writes a synthetic manifest in the SPEC 1.0 layout (metadata only, empty files where the tars would be, since
the loader refuses a share none of whose tars exists: every column of samples/*.parquet,
an alt-text of ~70 characters and one synthetic caption of ~140 characters per row, one source per part as
`aimv2 shard` writes them: one part per input tar), then for each world size W runs, in a fresh
subprocess, `Loader(MANIFEST, native_res=True, batch_patches=65536, rank=0, world_size=W)` (default mix:
Table 2 over dfn / coyo / hqitp) and reports:

* start-up: seconds from the call to a loader ready to make its first step (footers, the deal, reading
  its shares, the first segment's plan);
* peak memory: VmHWM of that process; the baseline is the same process on a 1,000-row manifest;
* bytes per served row: (peak - baseline) / rows this rank read;
* time to the first 100 step specs (what goes in each batch; no image bytes exist to decode);
* the manifest's footer cost per part (`Manifest()` alone), the per-part term of the start-up.

`--w1-rows` measures W = 1 on the first parts only (memory on a shared machine) and scales it linearly.
The extrapolation to 2 billion rows at W = 512 uses start-up = a * parts + b * rows / W and memory =
baseline + bytes_per_row * rows / W + per-part bytes, with a and b from this run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = (("dfn", 0.6), ("coyo", 0.2), ("hqitp", 0.2))   # row shares: far from the 60/6/31 mix
ROW_GROUP = 10_000
# Memory per manifest part (10 row groups a part): Manifest()'s VmHWM grew 0.8 KB a part from 100 to 1,500
# parts (footer summaries, file paths, chunk arrays), plus the loader's per-chunk keys and source lists.
PART_BYTES = 1_000


def write_manifest(root: Path, rows: int, parts: int, seed: int = 0) -> Path:
    import numpy as np
    import polars as pl

    from aimv2data.buckets import make_table

    table = make_table()
    samples = root / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    # empty stand-ins for the tars: the loader refuses a share none of whose tars exists (no bytes are read)
    (root.parent / "tars").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = "a photo of the small red dog with green grass under blue sky near old stone house in".split()
    base = " ".join(rng.choice(words, 4000))
    per = -(-rows // parts)
    bounds = np.cumsum([0] + [w for _, w in SOURCES])
    per_source = {}
    t0 = time.perf_counter()
    for k in range(parts):
        n = min(per, rows - k * per)
        if n <= 0:
            break
        src = SOURCES[int(np.searchsorted(bounds, (k + 0.5) / parts, side="right")) - 1][0]
        (root.parent / "tars" / f"{k:06d}.tar").touch()
        per_source[src] = per_source.get(src, 0) + n
        w = rng.integers(64, 1024, n, dtype=np.int32)
        h = (w / np.exp(rng.uniform(-1.2, 1.2, n))).clip(16, 4096).astype(np.int32)
        i = np.arange(n)
        off = rng.integers(0, len(base) - 200, n)
        key = pl.col("key")
        df = pl.DataFrame({
            "key": pl.Series(i).cast(pl.String).str.zfill(9),
            "_off": pl.Series(off, dtype=pl.Int64),
            "source": pl.repeat(src, n, eager=True),
            "uid": pl.Series(rng.integers(0, 2**62, n)).cast(pl.String),
            "sha256": pl.Series(rng.integers(0, 2**62, n)).cast(pl.String).str.zfill(64),
            "shard": pl.repeat(f"../tars/{k:06d}.tar", n, eager=True),
            "offset": pl.Series(i * 40_960 + 1024, dtype=pl.Int64),
            "size": pl.Series(rng.integers(8_000, 40_000, n), dtype=pl.Int64),
            "format": pl.repeat("jpeg", n, eager=True),
            "width": pl.Series(w, dtype=pl.Int32), "height": pl.Series(h, dtype=pl.Int32),
            "orientation": pl.repeat(1, n, eager=True, dtype=pl.Int8),
            "mode": pl.repeat("RGB", n, eager=True), "alpha": pl.repeat(False, n, eager=True),
            "bit_depth": pl.repeat(8, n, eager=True, dtype=pl.Int8),
            "original_width": pl.Series(w, dtype=pl.Int32), "original_height": pl.Series(h, dtype=pl.Int32),
            "bucket": pl.Series(table.assign(w, h), dtype=pl.Int16),
        }).with_columns(
            url=pl.lit("https://example.com/img/") + key + ".jpg",
            member=key + ".jpg",
            caption=pl.lit(base).str.slice(pl.col("_off"), 70),                  # alt-text, ~70 characters
            syn_dfn=pl.concat_list(pl.lit(base).str.slice(pl.col("_off") + 50, 140)),   # one synthetic, ~140
        ).drop("_off")
        tmp = samples / f".part-{k:06d}.parquet.tmp"
        df.write_parquet(tmp, row_group_size=ROW_GROUP)
        tmp.replace(samples / f"part-{k:06d}.parquet")
        print(f"\rwrote part {k + 1}/{parts} ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    meta = {"schema_version": "1.0", "patch_size": 14, "buckets": table.to_json(),
            "counts": {"samples": rows, "per_source": per_source}}
    (root / "_manifest.json").write_text(json.dumps(meta))
    return root


def measure(manifest: str, world: int, specs: int = 100, warm: str | None = None) -> dict:
    """In this (fresh) process: rank 0's loader at world size `world` (after a loader on the tiny manifest
    `warm`, so that one-off imports are not counted as start-up)."""
    import torch

    torch.set_num_threads(1)
    from aimv2data.loader import Loader
    from aimv2data.loader.samples import Manifest

    if warm:
        Loader(warm, native_res=True, batch_patches=65536, rank=0, world_size=1, workers=0)

    t0, c0 = time.perf_counter(), time.process_time()
    m = Manifest(manifest)
    footers, footers_cpu = time.perf_counter() - t0, time.process_time() - c0
    loader = Loader(m, native_res=True, batch_patches=65536, rank=0, world_size=world, workers=0)
    startup, startup_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    n = 0
    while n < specs:
        for i in range(len(loader.maker.plan)):
            loader.maker.spec(i)
            n += 1
            if n == specs:
                break
        if n < specs:
            loader._next_segment()
    first = time.perf_counter() - t0
    return {"world": world, "startup_s": round(startup, 3), "footers_s": round(footers, 3),
            "startup_cpu_s": round(startup_cpu, 3), "footers_cpu_s": round(footers_cpu, 3),
            "first_100_specs_s": round(first, 4), "rows_read": loader.stats["rows_read"],
            "parts": len(loader.manifest.files), "chunks": len(loader.manifest.chunk_rows),
            "rows": loader.manifest.n, "vmhwm_bytes": _vmhwm()}


def _vmhwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _sub(manifest: Path, world: int, cpu: str = "1") -> dict:
    cmd = [sys.executable, __file__, "--measure", str(manifest), "--world", str(world),
           "--warm", str(Path(manifest).parent / "tiny")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1"}
    if cpu and shutil.which("taskset"):
        cmd = ["taskset", "-c", cpu, *cmd]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=100)
    ap.add_argument("--worlds", default="1,8,64")
    ap.add_argument("--w1-rows", type=int, default=0, help="measure W=1 on this many rows (the first parts)")
    ap.add_argument("--out", default="/tmp/aimv2_scale_manifest")
    ap.add_argument("--keep", action="store_true", help="keep the manifest")
    ap.add_argument("--reuse", action="store_true", help="measure a manifest --keep left in --out")
    ap.add_argument("--cpu", default="1", help="taskset CPU list of each measuring process ('' = not pinned)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    ap.add_argument("--report", metavar="STDERR", help="recompute the table from a run's stderr lines")
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.world, warm=a.warm)))
        return
    if a.report:   # recompute the report from the per-W lines a run printed to stderr
        lines = [json.loads(x) for x in open(a.report) if x.startswith('{"world"')]
        base = {"vmhwm_bytes": lines[0]["vmhwm_bytes"] - lines[0]["peak_above_base"]}
        print(json.dumps(report(lines, base, a.rows, a.parts), indent=1))
        return
    out = Path(a.out)
    if out.exists() and not a.reuse:
        shutil.rmtree(out)
    try:
        t0 = time.perf_counter()
        if not a.reuse:
            write_manifest(out / "full", a.rows, a.parts)
            write_manifest(out / "tiny", 1000, 4)
        bytes_on_disk = sum(f.stat().st_size for f in (out / "full" / "samples").glob("*.parquet"))
        print(f"manifest: {a.rows} rows, {a.parts} parts, {bytes_on_disk / 1e9:.2f} GB, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        base = _sub(out / "tiny", 1, a.cpu)
        results = []
        for w in (int(x) for x in a.worlds.split(",")):
            man = out / "full"
            if w == 1 and a.w1_rows and a.w1_rows < a.rows:
                # the first parts only (their own manifest directory, sharing the files by symlink)
                k = -(-a.w1_rows * a.parts // a.rows)
                sub = out / "w1"
                (sub / "samples").mkdir(parents=True, exist_ok=True)
                files = sorted((out / "full" / "samples").glob("part-*.parquet"))
                # keep the source mix of the full manifest: every (parts / k)-th part
                for f in files[:: max(1, len(files) // k)][:k]:
                    (sub / "samples" / f.name).symlink_to(f)
                shutil.copy(out / "full" / "_manifest.json", sub / "_manifest.json")
                man = sub
            r = _sub(man, w, a.cpu)
            r["scale"] = a.rows / r["rows"]
            r["peak_above_base"] = r["vmhwm_bytes"] - base["vmhwm_bytes"]
            r["bytes_per_row"] = round(r["peak_above_base"] / max(1, r["rows_read"]), 1)
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
        print(json.dumps(report(results, base, a.rows, a.parts), indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)


def report(results, base, rows, parts) -> dict:
    """The table at full scale (W=1 scaled when measured on fewer rows) and the 2B / W=512 extrapolation."""
    table = []
    for r in results:
        s = r["scale"]
        per_part = r["footers_cpu_s"] / r["parts"]
        startup = r["startup_cpu_s"] if s == 1 else per_part * parts + (r["startup_cpu_s"] - r["footers_cpu_s"]) * s
        peak = r["peak_above_base"] * s
        table.append({"W": r["world"], "startup_cpu_s": round(startup, 2), "startup_wall_s": r["startup_s"],
                      "peak_above_base_GB": round(peak / 1e9, 3),
                      "vmhwm_GB": round((base["vmhwm_bytes"] + peak) / 1e9, 3), "bytes_per_served_row":
                      r["bytes_per_row"], "rows_read": int(r["rows_read"] * s), "first_100_specs_s":
                      r["first_100_specs_s"], "measured_rows": r["rows"]})
    big = max(results, key=lambda r: r["world"])
    per_part = big["footers_cpu_s"] / big["parts"]
    per_row_s = (big["startup_cpu_s"] - big["footers_cpu_s"]) / max(1, big["rows_read"])
    rows_per_part = rows / parts
    n2, w2 = 2_000_000_000, 512
    parts2 = n2 / rows_per_part
    share2 = n2 / w2
    # bytes per row from the measured share nearest the extrapolated one (fixed costs weigh on small shares)
    bpr = min(results, key=lambda r: abs(math.log(max(1, r["rows_read"]) / share2)))["bytes_per_row"]
    ext = {"rows": n2, "W": w2, "parts": int(parts2), "rows_per_rank": int(share2),
           "startup_cpu_s": round(per_part * parts2 + per_row_s * share2, 1),
           "memory_GB": round((base["vmhwm_bytes"] + bpr * share2 + PART_BYTES * parts2) / 1e9, 2),
           "model": f"start-up = {per_part * 1e3:.2f} CPU-ms/part x parts + {per_row_s * 1e6:.2f} CPU-us/row x rows/W; "
                    f"memory = {base['vmhwm_bytes'] / 1e9:.2f} GB baseline + {bpr:.0f} B/row x rows/W + "
                    f"{PART_BYTES} B/part x parts"}
    w1 = next((t for t in table if t["W"] == 1), None)
    w64 = next((t for t in table if t["W"] == 64), None)
    ratios = None
    if w1 and w64:
        ratios = {"startup_W64_over_W1": round(w64["startup_cpu_s"] / w1["startup_cpu_s"], 4),
                  "memory_above_base_W64_over_W1": round(w64["peak_above_base_GB"] / w1["peak_above_base_GB"], 4)}
    return {"baseline_vmhwm_GB": round(base["vmhwm_bytes"] / 1e9, 3), "table": table, "ratios": ratios,
            "extrapolation": ext}


if __name__ == "__main__":
    main()
