"""Loader figures, each measured on one core (the first CPU this process may use), ours against a baseline in the same run.

    .venv/bin/python benchmarks/bench_loader.py                 # generate corpora (cached), measure, print
    .venv/bin/python benchmarks/bench_loader.py --write         # ... and write benchmarks/loader-latest.md

1. Fixed-res 224 throughput: the `pil` loader (Pillow-SIMD, JPEG draft decoding, reads by manifest
   offset) vs an open_clip-style baseline over the SAME tars: a webdataset 0.2 pipeline
   (tarfile_to_samples -> decode("pilrgb") -> RandomResizedCrop done with PIL the way torchvision does
   it: full decode, crop, bicubic resize, hflip -> ToTensor -> Normalize -> batched). The loader hands
   over uint8 batches (issue 22: the model normalises on the device), the baseline float32 ones, as
   open_clip's does. Also the loader without draft decoding (where the speed comes from) and the `dali`
   decoder on the CPU.
2. Native resolution: `pil` vs `dali` images/s and patches/s on the photo corpus.
3. Budget: mean budget use sum(B*h*w) / (steps*C) and padding over many native-resolution steps on a
   corpus of a few thousand small images of varied aspect.

Corpora: "photos" (long side 800-2000 px, natural images from scikit-image with sensor grain, JPEG
q 88, 1 in 8 with an EXIF orientation), "lite" (the same sizes at q 75 without grain: fewer bits per
pixel) and "small" (64-320 px, aspects 1:4..4:1), written as
img2dataset-style tars and indexed by the real `aimv2 shard` (aimv2data.manifest.build) when present,
else by tests/_loader_fixtures.py. Repetitions alternate baseline and ours; figures are medians.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


# --- corpora ------------------------------------------------------------------------------------------

def corpus(work: Path, name: str, **kw) -> Path:
    """Tars + manifest under work/name (reused when complete); returns the manifest dir."""
    from _loader_fixtures import build_manifest

    d = work / name
    man = d / "shard-manifest"
    if (man / "_manifest.json").is_file():
        return man
    if d.exists():
        shutil.rmtree(d)
    t = time.time()
    fixture = build_manifest(d, **kw)
    try:
        from aimv2data.manifest.build import build_manifest as shard
    except ImportError:
        print(f"[corpus] {name}: aimv2 shard not available, using the fixture manifest", file=sys.stderr)
        return fixture
    r = shard([str(d / "tars")], man, workers=1, progress=False)
    if not r["merged"]:
        raise RuntimeError(f"aimv2 shard did not finish the {name} manifest: {r}")
    print(f"[corpus] {name}: {r['samples']} samples ({r['rejects']} rejected) in {time.time() - t:.0f} s",
          file=sys.stderr)
    return man


# --- the open_clip-style baseline ----------------------------------------------------------------------

def baseline(tars: list[str], n_images: int, batch_size: int, resolution: int = 224, seed: int = 0) -> dict:
    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image

    from aimv2data.batch import MEAN, STD
    from aimv2data.loader.geometry import random_resized_crop

    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)

    def preprocess(img):
        # torchvision RandomResizedCrop(224, (0.4, 1), (3/4, 4/3), BICUBIC) on a PIL image:
        # F.resized_crop = img.crop(box).resize(size, BICUBIC); RandomHorizontalFlip; ToTensor; Normalize.
        c = random_resized_crop(img.width, img.height, resolution, rng)
        img = img.crop(tuple(int(v) for v in c.box)).resize((resolution, resolution), Image.BICUBIC)
        if c.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return (x.float().div(255) - mean) / std

    def collate(samples):
        imgs, texts = zip(*samples)
        return torch.stack(imgs), list(texts)

    pipe = wds.DataPipeline(
        wds.SimpleShardList(tars), wds.split_by_worker, wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.decode("pilrgb", handler=wds.warn_and_continue), wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess), wds.to_tuple("image", "text"), wds.batched(batch_size, collation_fn=collate))
    n, t0, c0 = 0, None, None
    while n < n_images:
        for imgs, _ in pipe:
            if t0 is None:              # first batch untimed (opening files, imports)
                t0, c0 = time.perf_counter(), time.process_time()
                continue
            n += len(imgs)
            if n >= n_images:
                break
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return {"images": n, "elapsed_s": dt, "images_per_s": n / dt, "cpu_s": dc, "images_per_cpu_s": n / dc}


# --- running one configuration on one core ------------------------------------------------------------

def one_core(args: list[str], env_extra: dict | None = None) -> dict:
    """Run `args` pinned to one CPU (the first this process may use: `taskset -c 1 python bench_loader.py`
    picks CPU 1) with one thread everywhere; returns the JSON its stdout ends with."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1", **(env_extra or {}))
    pin = ["taskset", "-c", str(min(os.sched_getaffinity(0)))] if shutil.which("taskset") else []
    out = subprocess.run(pin + args, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ours(manifest: Path, *opts: str, env_extra: dict | None = None) -> dict:
    return one_core([sys.executable, "-m", "cli.main", "bench", "loader", str(manifest), *opts, "--json"], env_extra)


def hiding(work: Path, *modules: str) -> dict:
    """Environment in which importing `modules` fails (a sitecustomize that marks them absent in sys.modules;
    worker processes inherit it). Hiding `aimv2data.loader._jpegcrop` gives the `pil` decoder without the
    crop window (whole images via simplejpeg); hiding simplejpeg too gives its Pillow `draft` path (the
    decoder before issue 15, and its fallback when neither binding is there)."""
    d = work / ("hide-" + "-".join(m.rsplit(".", 1)[-1] for m in modules))
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({list(modules)!r}))\n")
    return {"PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")])}


def base(manifest: Path, n_images: int, batch_size: int) -> dict:
    tars = sorted(str(p) for p in (manifest.parent / "tars").glob("*.tar"))
    return one_core([sys.executable, __file__, "--baseline-only", json.dumps([tars, n_images, batch_size])])


NOTE_BUDGET = (
    'Small areas need many images of one bucket (C/128 of them): the 3000-image corpus spreads over 33 '
    'buckets (~90 each), so at C = 16384 no bucket ever holds a 128-image batch and those steps take the '
    'next area that fits (the epoch-tail rule). Budget use depends on the grids (h·w ≤ A), not on that '
    'mix: with the bucket table of `aimv2 shard` the `area` rule uses 95.5-97 %, the `grid` rule '
    '97.5-98.5 %. Padding is 0 by construction (every image covers its grid).'
)


def bpp(manifest: Path) -> float:
    """Mean compressed bits per display pixel of a manifest's images."""
    import polars as pl

    df = pl.read_parquet(sorted((manifest / "samples").glob("*.parquet")))
    return float((df["size"] * 8 / (df["width"] * df["height"])).mean())


def med(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def fixed_only(photos: Path, a) -> None:
    """Baseline vs the `pil` loader at fixed 224 on `photos`, alternating, one core each."""
    n_img = a.batch_size * a.steps
    fixed = ["--resolution", "224", "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--warmup", "1"]
    load0 = os.getloadavg()[0]
    whole = hiding(Path(a.work), "aimv2data.loader._jpegcrop")
    draft = hiding(Path(a.work), "aimv2data.loader._jpegcrop", "simplejpeg")
    rs = {"baseline": [], "pil": [], "pil-whole": [], "pil-draft": []}
    for r in range(a.repeats):
        rs["baseline"].append(base(photos, n_img, a.batch_size))
        rs["pil"].append(ours(photos, *fixed, "--image-decoder", "pil", "--seed", str(r)))
        rs["pil-whole"].append(ours(photos, *fixed, "--image-decoder", "pil", "--seed", str(r), env_extra=whole))
        rs["pil-draft"].append(ours(photos, *fixed, "--image-decoder", "pil", "--seed", str(r), env_extra=draft))
        print(f"repeat {r + 1}: images per CPU-s " + ", ".join(f"{k} {v[-1]['images_per_cpu_s']:.1f}"
                                                             for k, v in rs.items()), flush=True)
    b = med(rs["baseline"], "images_per_cpu_s")
    print(f"{datetime.date.today()} `{rs['pil'][0]['cpu']}`, load {load0:.1f} -> {os.getloadavg()[0]:.1f}; corpus "
          f"`photos` {a.photos} images ({bpp(photos):.2f} bits/px), batch {a.batch_size} x {a.steps} steps, "
          f"medians of {a.repeats}, images per CPU-s (wall images/s): " + "; ".join(
              f"{k} {med(v, 'images_per_cpu_s'):.1f} ({med(v, 'images_per_s'):.1f}), "
              f"**{med(v, 'images_per_cpu_s') / b:.2f}x**" for k, v in rs.items()))


def main():
    a = _parse_args()
    if a.baseline_only:
        tars, n, bs = json.loads(a.baseline_only)
        print(json.dumps(baseline(tars, n, bs)))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    photos = corpus(work, f"photos-{a.photos}", n=a.photos, seed=1, shards=max(1, a.photos // 500), photo=True,
                    min_side=800, max_side=2000, aspects=[9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9],
                    exif_every=8, quality=88)
    if a.fixed_only:
        return fixed_only(photos, a)
    lite = corpus(work, f"photos-lite-{a.lite}", n=a.lite, seed=3, shards=max(1, a.lite // 500), photo=True,
                  min_side=800, max_side=2000, aspects=[9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9],
                  quality=75, grain=0.0)
    small = corpus(work, f"small-{a.small}", n=a.small, seed=2, shards=max(1, a.small // 1000), min_side=64,
                   max_side=320)
    load0 = os.getloadavg()
    runs = _measure(photos, lite, small, a)
    text = "\n".join(_head_lines(a, photos, load0, runs["fixed"]) + _fixed_lines(a, photos, lite, runs)
                     + _native_lines(runs)) + "\n"
    print(text)
    if a.write:
        _write_latest(text)


def _parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "aimv2-bench-loader"),
                    help="Where corpora are generated (and reused).")
    ap.add_argument("--photos", type=int, default=2000, help="Photo-size JPEGs (800-2000 px).")
    ap.add_argument("--lite", type=int, default=1000, help="Photo-size JPEGs at q75 without grain (fewer bits/pixel).")
    ap.add_argument("--small", type=int, default=3000, help="Small images for the budget figure.")
    ap.add_argument("--repeats", type=int, default=3, help="Alternating repetitions per comparison.")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="Timed steps per fixed-res run.")
    ap.add_argument("--budget-steps", type=int, default=200, help="Native-res steps per budget figure.")
    ap.add_argument("--write", action="store_true", help="Also write the report to benchmarks/loader-latest.md "
                    "(paste it into the Loader section of benchmarks/RESULTS.md).")
    ap.add_argument("--fixed-only", action="store_true",
                    help="Only the fixed-224 comparison on `photos`: baseline vs the `pil` loader vs the `pil` "
                         "loader with simplejpeg hidden (its Pillow draft path), alternating (issue 15).")
    ap.add_argument("--baseline-only", help=argparse.SUPPRESS)
    return ap.parse_args()


def _measure(photos: Path, lite: Path, small: Path, a) -> dict:
    """Every run of the report, the comparisons alternating repeat by repeat."""
    bs, steps = a.batch_size, a.steps
    n_img = bs * steps
    fixed = ["--resolution", "224", "--batch-size", str(bs), "--steps", str(steps), "--warmup", "1"]
    res = {"baseline": [], "pil": [], "pil_nodraft": [], "dali": []}
    for r in range(a.repeats):
        print(f"[fixed-224] repeat {r + 1}/{a.repeats}", file=sys.stderr)
        res["baseline"].append(base(photos, n_img, bs))
        res["pil"].append(ours(photos, *fixed, "--image-decoder", "pil", "--seed", str(r)))
        res["pil_nodraft"].append(ours(photos, *fixed, "--image-decoder", "pil", "--no-draft", "--seed", str(r)))
        res["dali"].append(ours(photos, *fixed, "--image-decoder", "dali", "--seed", str(r)))
    lite_res = {"baseline": [], "pil": []}
    for r in range(a.repeats):
        print(f"[fixed-224 lite] repeat {r + 1}/{a.repeats}", file=sys.stderr)
        lite_res["baseline"].append(base(lite, n_img, bs))
        lite_res["pil"].append(ours(lite, *fixed, "--image-decoder", "pil", "--seed", str(r)))
    native = {"pil": [], "dali": []}
    nat = ["--native-res", "--batch-patches", "16384", "--steps", "12", "--warmup", "1"]
    for r in range(a.repeats):
        print(f"[native] repeat {r + 1}/{a.repeats}", file=sys.stderr)
        for d in native:
            native[d].append(ours(photos, *nat, "--image-decoder", d, "--seed", str(r)))
    budget = {}
    for c in (8192, 16384):
        for rule in ("area", "grid"):
            print(f"[budget] C={c} {rule}", file=sys.stderr)
            budget[c, rule] = ours(small, "--native-res", "--batch-patches", str(c), "--batch-rule", rule,
                                   "--steps", str(a.budget_steps), "--warmup", "0", "--image-decoder", "pil")
    return {"fixed": res, "lite": lite_res, "native": native, "budget": budget}


def _head_lines(a, photos: Path, load0, res: dict) -> list[str]:
    cpu = res["pil"][0]["cpu"]
    bs, steps = a.batch_size, a.steps
    return [
        "# Loader benchmarks (issue 4)",
        "",
        f"Date: {datetime.date.today().isoformat()} · machine: `{cpu}`, {os.cpu_count()} cores "
        f"(shared with other jobs), every figure on ONE core (`taskset -c {min(os.sched_getaffinity(0))}`, one thread) · Python "
        f"{platform.python_version()}, Pillow-SIMD, DALI CPU (no GPU on this machine). Load average (1 min) at "
        f"start / end: {load0[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.",
        "",
        "Command: `.venv/bin/python benchmarks/bench_loader.py --write` "
        f"(`--photos {a.photos} --lite {a.lite} --small {a.small} --repeats {a.repeats} --batch-size {bs} "
        f"--steps {steps}`); "
        "medians of the alternating repeats.",
        "",
        f"Corpus `photos`: {a.photos} JPEGs, long side 800-2000 px, photo aspects 9:16..16:9, q88 with sensor-like "
        f"grain ({bpp(photos):.2f} bits/pixel), 1 in 8 with an EXIF orientation, in img2dataset-style tars indexed "
        "by `aimv2 shard`. Corpus `small`: "
        f"{a.small} JPEGs of 64-320 px, aspects log-uniform 1:4..4:1.",
        "",
    ]


def _fixed_lines(a, photos: Path, lite: Path, runs: dict) -> list[str]:
    res, lite_res = runs["fixed"], runs["lite"]
    ips = {k: med(v, "images_per_s") for k, v in res.items()}
    ipc = {k: med(v, "images_per_cpu_s") for k, v in res.items()}
    return [
        "## Fixed resolution 224 (RandomResizedCrop 0.4-1, bicubic, hflip), images/s on one core",
        "",
        "| pipeline | images/s (wall) | vs baseline | images per CPU-s | vs baseline |",
        "|---|---:|---:|---:|---:|",
        f"| open_clip-style baseline (webdataset, full PIL decode, torchvision-style RRC) | {ips['baseline']:.1f} | "
        f"1.00x | {ipc['baseline']:.1f} | 1.00x |",
        f"| `pil` loader (draft decoding) | {ips['pil']:.1f} | **{ips['pil'] / ips['baseline']:.2f}x** | "
        f"{ipc['pil']:.1f} | **{ipc['pil'] / ipc['baseline']:.2f}x** |",
        f"| `pil` loader, `--no-draft` | {ips['pil_nodraft']:.1f} | {ips['pil_nodraft'] / ips['baseline']:.2f}x | "
        f"{ipc['pil_nodraft']:.1f} | {ipc['pil_nodraft'] / ipc['baseline']:.2f}x |",
        f"| `dali` loader, CPU, 1 thread | {ips['dali']:.1f} | {ips['dali'] / ips['baseline']:.2f}x | "
        f"{ipc['dali']:.1f} | {ipc['dali'] / ipc['baseline']:.2f}x |",
        "",
        f"Same comparison on corpus `lite` ({a.lite} photo-size JPEGs at q75 without grain, "
        f"{bpp(lite):.2f} bits/pixel vs {bpp(photos):.2f} for `photos`): baseline "
        f"{med(lite_res['baseline'], 'images_per_cpu_s'):.1f}, `pil` loader {med(lite_res['pil'], 'images_per_cpu_s'):.1f} "
        f"images per CPU-s (**{med(lite_res['pil'], 'images_per_cpu_s') / med(lite_res['baseline'], 'images_per_cpu_s'):.2f}x**"
        "); "
        f"wall {med(lite_res['baseline'], 'images_per_s'):.1f} vs {med(lite_res['pil'], 'images_per_s'):.1f} images/s "
        f"({med(lite_res['pil'], 'images_per_s') / med(lite_res['baseline'], 'images_per_s'):.2f}x). Draft decoding "
        "cuts the IDCT, colour conversion and resize work but not Huffman decoding, so the gain grows as the "
        "bits per pixel fall.",
        "",
        "Images per CPU-second (process CPU time, DALI's threads included) is the steadier per-core figure on "
        "this shared machine; wall-clock images/s includes time the pinned core spent on other users' jobs.",
        "",
        "Per repeat, wall images/s (baseline / pil / pil no-draft / dali): " + "; ".join(
            f"{b['images_per_s']:.0f} / {p['images_per_s']:.0f} / {q['images_per_s']:.0f} / {d['images_per_s']:.0f}"
            for b, p, q, d in zip(res["baseline"], res["pil"], res["pil_nodraft"], res["dali"])),
        "",
    ]


def _native_lines(runs: dict) -> list[str]:
    native, budget = runs["native"], runs["budget"]
    lines = [
        "## Native resolution (C = 16384 patches/step, p = 14), one core",
        "",
        "| decoder | images/s (wall) | images per CPU-s | patches/s (wall) | budget use | padding |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for d, rs in native.items():
        lines.append(f"| `{d}` | {med(rs, 'images_per_s'):.1f} | {med(rs, 'images_per_cpu_s'):.1f} | "
                     f"{med(rs, 'patches_per_s'):.0f} | "
                     f"{100 * med(rs, 'budget_use'):.2f} % | {100 * med(rs, 'padding'):.2f} % |")
    lines += ["", "## Budget use and padding (native resolution, corpus `small`, `aimv2 shard`'s 33-bucket table)", "",
              "`area`: B = C / A (the issue's rule, exact); `grid`: B = C // (h·w).", "",
              "| C | batch rule | steps | budget use Σ B·h·w / (steps·C) | padding | steps per area used |",
              "|---:|---|---:|---:|---:|---|"]
    for (c, rule), r in budget.items():
        lines.append(f"| {c} | {rule} | {r['steps']} | {100 * r['budget_use']:.2f} % | {100 * r['padding']:.2f} % | "
                     + ", ".join(f"{k}: {v}" for k, v in r["areas"].items()) + " |")
    lines += ["", NOTE_BUDGET]
    return lines


def _write_latest(text: str) -> None:
    out = ROOT / "benchmarks" / "loader-latest.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
