"""CPU decoding per CPU-second: open_clip-style baseline vs the `pil` loader's decoder vs the entropy floor
(issue 15, point 5). In-memory JPEG bytes, so only decoding, cropping, resizing and (the baseline's)
normalising count: the loader's batches are uint8 since issue 22, normalised by the model on the device.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_decode.py [--rounds 5]

Corpora (JPEG 4:2:0, made by this script):
  generated  ~0.4 MP (768x512 / 512x768) natural-image crops with sensor-like grain, q90 (tests/_loader_fixtures.py)
  pattern    ~0.4 MP smooth synthetic patterns, q90 (fewer bits per pixel)
  skimage    scikit-image's bundled colour photos at their own sizes (0.14-2 MP), q90
  large      0.6-4 MP photos (long side 800-2000 px, aspects 9:16..16:9), q88 with grain (bench_loader.py's `photos`)
Modes: fixed 224 (RandomResizedCrop 0.4-1, flip; the draws of aimv2data.loader.geometry) and native
resolution (cover + centre crop to the p=14 grid of ~256 patches with the image's aspect).

Pipelines, one thread, images per CPU-second (process time: other jobs share this machine):
  baseline   open_clip / torchvision style: full decode, crop, bicubic resize, flip, ToTensor, Normalize
  pil-draft  the `pil` decoder before issue 15 (Pillow `draft`), whole uint8 batch
  pil-whole  the `pil` decoder without the crop-window binding (`_jpegcrop` hidden): simplejpeg decodes the
             whole image at the chosen scale
  pil        the `pil` decoder now: the crop window at the chosen scale (`_jpegcrop`) + Pillow-SIMD resize
  floor      libjpeg-turbo decode at 1/8 (Huffman decoding + DC-only IDCT): what any decoder that
             reads every bit must spend; nothing a loader does on top comes free
  window, window+resize   `pil`'s decode alone, and decode + resize: the steps of `pil`, for the bound table
Rounds interleave the pipelines batch by batch (every other round in reverse order); rates are medians over
rounds, ratios to the baseline medians of the per-round ratios (a slow spell of this shared machine hits all). A second
table splits `pil` into steps by differences of those medians (what bounds it); a third splits one profiled
pass (cProfile, which inflates the Python parts a little) of `baseline` and `pil` into stages.
"""
from __future__ import annotations

import argparse
import datetime
import io
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from aimv2data.batch import MEAN, STD  # noqa: E402
from aimv2data.loader.geometry import cover, random_resized_crop  # noqa: E402

P = 14


def _jpeg(im: Image.Image, quality: int = 90) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=quality)
    return b.getvalue()


def corpus(name: str, n: int) -> list[bytes]:
    from _loader_fixtures import make_image

    rng = np.random.default_rng(0)
    if name == "skimage":
        from skimage import data

        srcs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.hubble_deep_field(),
                data.retina(), data.immunohistochemistry(), data.stereo_motorcycle()[0], data.cat()]
        imgs = [_jpeg(Image.fromarray(s[..., :3])) for s in srcs]
        return [imgs[i % len(imgs)] for i in range(n)]
    if name == "large":
        out = []
        for _ in range(n):
            long, aspect = int(rng.integers(800, 2001)), math.exp(rng.uniform(math.log(9 / 16), math.log(16 / 9)))
            w, h = (long, round(long / aspect)) if aspect >= 1 else (round(long * aspect), long)
            out.append(_jpeg(make_image(w, h, rng, photo=True), quality=88))
        return out
    return [_jpeg(make_image(*((768, 512) if i % 2 else (512, 768)), rng, photo=name == "generated"))
            for i in range(n)]


def grid_for(w: int, h: int, area: int = 256) -> tuple[int, int]:
    gh = max(1, round(math.sqrt(area * h / w)))
    return gh, max(1, area // gh)


def crops(datas: list[bytes], mode: str) -> list:
    rng = np.random.default_rng(1)
    out = []
    for d in datas:
        w, h = Image.open(io.BytesIO(d)).size
        if mode == "fixed":
            out.append(random_resized_crop(w, h, 224, rng))
        else:
            gh, gw = grid_for(w, h)
            out.append(cover(w, h, gw * P, gh * P))
    return out


_MEAN = torch.tensor(MEAN).view(3, 1, 1)
_STD = torch.tensor(STD).view(3, 1, 1)


def baseline(datas, cs, batch):
    """torchvision RandomResizedCrop/Resize+CenterCrop on a fully decoded PIL image, ToTensor, Normalize."""
    for i in range(0, len(datas), batch):
        xs = []
        for d, c in zip(datas[i:i + batch], cs[i:i + batch]):
            im = Image.open(io.BytesIO(d)).convert("RGB")
            im = im.crop(tuple(int(round(v)) for v in c.box)).resize(c.out, Image.BICUBIC)
            if c.flip:
                im = im.transpose(Image.FLIP_LEFT_RIGHT)
            x = torch.from_numpy(np.array(im, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
            xs.append((x.float().div(255) - _MEAN) / _STD)
        if len({x.shape for x in xs}) == 1:
            torch.stack(xs)


def ours(turbo: bool, window: bool = True):
    from aimv2data.loader import decode_turbo
    from aimv2data.loader.decode_pil import PilDecoder

    dec = PilDecoder(turbo=turbo)

    def run(datas, cs, batch):
        binding = decode_turbo._jpegcrop
        decode_turbo._jpegcrop = binding if window else None
        try:
            for i in range(0, len(datas), batch):
                sub = list(zip(datas[i:i + batch], cs[i:i + batch]))
                by_size = {}
                for d, c in sub:                       # a batch has one output size (as in the loader)
                    by_size.setdefault(c.out, []).append((d, c))
                for group in by_size.values():
                    dec.decode_batch([d for d, _ in group], [c for _, c in group], [1] * len(group))
        finally:
            decode_turbo._jpegcrop = binding
    return run


def floor(datas, cs, batch):
    import simplejpeg

    for d in datas:
        simplejpeg.decode_jpeg(d, "RGB", min_width=1, min_height=1)     # the smallest scale: 1/8


def window(datas, cs, batch):
    """`pil`'s decode alone: the crop window at the chosen scale, in display orientation."""
    from aimv2data.loader import decode_turbo

    for d, c in zip(datas, cs):
        decode_turbo.decode_window(d, c)


def window_resized(datas, cs, batch):
    """`pil`'s decode + resize (+ flip), without validation and the batch buffer."""
    from aimv2data.loader import decode_turbo
    from aimv2data.loader.decode_pil import _finish

    for d, c in zip(datas, cs):
        im, box, _ = decode_turbo.decode_window(d, c)
        _finish(im, box, c)


def fidelity(datas, cs) -> dict:
    """Per-image mean |difference| (CLIP-normalised units) from a full decode + antialiased bicubic resize
    of the same box: (mean, max) over the corpus for the decoder before and now."""
    from aimv2data.loader.decode_pil import PilDecoder

    ref, before, now = PilDecoder(draft=False, turbo=False), PilDecoder(turbo=False), PilDecoder()
    out = {"pil-draft": [], "pil": []}
    for d, c in zip(datas, cs):
        r = ref.decode(d, c, 1).astype(np.float32)
        for k, dec in (("pil-draft", before), ("pil", now)):
            out[k].append(float(np.abs(dec.decode(d, c, 1).astype(np.float32) - r).mean()) / 255 / 0.27)
    return {k: (statistics.mean(v), max(v)) for k, v in out.items()}


# cProfile entries -> stages: (stage, substrings of the entry's name); a function's own time (tottime) counts,
# except "validate", whose Python helpers are counted whole (cumulative).
STAGES = [("validate", ("jpeg_problem",)), ("decode", ("_jpegcrop.decode", "decode_jpeg", "ImagingDecoder")),
          ("crop", ("'crop' of",)), ("resize", ("'resize' of",)), ("flip/transpose", ("'transpose' of",)),
          ("to tensor + normalise", ("copy_", "mul_", "add_", "'sub'", "'div'", "float", "contiguous", "stack",
                                     "from_numpy", "permute", "numpy.zeros", "numpy.array", "__array__"))]


def profile(fn, datas, cs, batch) -> dict:
    """ms per image by stage (STAGES, then "other": Python, image allocation, copies) in one profiled pass."""
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.runcall(fn, datas, cs, batch)
    st = pstats.Stats(pr).stats                                 # {(file, line, name): (cc, nc, tt, ct, callers)}
    out = dict.fromkeys([k for k, _ in STAGES], 0.0)
    total = 0.0
    for (file, _, name), (_, _, tt, ct, _) in st.items():
        total += tt
        label = f"{file}:{name}"
        for stage, keys in STAGES:
            if any(k in label for k in keys):
                out[stage] += ct if stage == "validate" else tt
                break
    claimed = sum(out.values())
    out = {k: 1e3 * v / len(datas) for k, v in out.items()}
    out["other"] = 1e3 * (total - claimed) / len(datas)
    out["total"] = 1e3 * total / len(datas)
    return out


def measure(pipes: dict, datas, cs, batch, reverse: bool) -> dict[str, float]:
    """One round: images per CPU-second of each pipeline over the corpus, interleaved batch by batch
    (each batch through every pipeline in turn), so that all of them see the same spells of the machine."""
    spent = dict.fromkeys(pipes, 0.0)
    for i in range(0, len(datas), batch):
        for k in list(pipes)[::-1 if reverse else 1]:
            t = time.process_time()
            pipes[k](datas[i:i + batch], cs[i:i + batch], batch)
            spent[k] += time.process_time() - t
    return {k: len(datas) / v for k, v in spent.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120, help="Images per corpus.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--corpora", default="generated,pattern,skimage,large")
    a = ap.parse_args()
    torch.set_num_threads(1)
    pipes = {"baseline": baseline, "pil-draft": ours(False), "pil-whole": ours(True, window=False), "pil": ours(True),
             "floor": floor, "window": window, "window+resize": window_resized}
    load0 = os.getloadavg()[0]
    rows, split = [], []
    for name in a.corpora.split(","):
        datas = corpus(name, a.images)
        sizes = [Image.open(io.BytesIO(d)).size for d in datas]
        mp = statistics.mean(w * h for w, h in sizes)
        bpp = statistics.mean(8 * len(d) / (w * h) for d, (w, h) in zip(datas, sizes))
        for mode in ("fixed", "native"):
            cs = crops(datas, mode)
            res = {k: [] for k in pipes}
            for r in range(a.rounds):                  # every other round in reverse order: no pipeline always first
                for k, v in measure(pipes, datas, cs, a.batch, reverse=r % 2 == 1).items():
                    res[k].append(v)
            med = {k: statistics.median(v) for k, v in res.items()}
            # ratios to the baseline: medians of the per-round ratios (a slow spell of the machine hits both)
            med.update({f"{k}/b": statistics.median(x / b for x, b in zip(v, res["baseline"])) for k, v in res.items()})
            rows.append((name, mode, mp / 1e6, bpp, med, fidelity(datas, cs)))
            split += [(name, mode, k, profile(pipes[k], datas, cs, a.batch)) for k in ("baseline", "pil")]
            print(f"[{name} {mode}] " + ", ".join(f"{k} {med[k]:.0f}" for k in pipes) +
                  "; pil/baseline per round " + " ".join(f"{x / b:.2f}" for x, b in zip(res["pil"], res["baseline"])),
                  file=sys.stderr, flush=True)
    report(a, load0, rows, split)


def report(a, load0, rows, split) -> None:
    from aimv2data.loader import decode_turbo

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"Date {datetime.date.today()} · `{cpu}`, {os.cpu_count()} cores shared with other jobs (load "
          f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end), affinity {sorted(os.sched_getaffinity(0))}, "
          f"one thread · Python {platform.python_version()}, Pillow-SIMD {Image.__version__} (all pipelines), "
          f"`_jpegcrop` {'built' if decode_turbo._jpegcrop else 'NOT built'} · {a.images} images per corpus, "
          f"batch {a.batch}, median of {a.rounds} interleaved rounds, images per CPU-second")
    print()
    print("| corpus | mode | MP | bits/px | baseline | `pil` before (draft) | `pil` whole image | `pil` now "
          "| now vs baseline | whole vs baseline | before vs baseline | floor (1/8 decode) | floor vs baseline "
          "| `pil` now / floor | diff from full decode, before (mean / max) | now (mean / max) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, mode, mp, bpp, m, f in rows:
        b = m["baseline"]
        print(f"| {name} | {mode} | {mp:.2f} | {bpp:.2f} | {b:.0f} | {m['pil-draft']:.0f} | {m['pil-whole']:.0f} | "
              f"{m['pil']:.0f} | **{m['pil/b']:.2f}x** | {m['pil-whole/b']:.2f}x | {m['pil-draft/b']:.2f}x | "
              f"{m['floor']:.0f} | {m['floor/b']:.2f}x | {m['pil/b'] / m['floor/b']:.2f} | "
              f"{f['pil-draft'][0]:.4f} / {f['pil-draft'][1]:.4f} | {f['pil'][0]:.4f} / {f['pil'][1]:.4f} |")
    print()
    print("What bounds `pil`: ms per image, from the medians above (differences of pipelines that share their steps)")
    print()
    print("| corpus | mode | baseline | `pil` | entropy floor | + window's IDCT, upsampling, colour | + resize, flip "
          "| + validation, uint8 batch | baseline / (floor + resize + last column) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, mode, _, _, m, _ in rows:
        ms = {k: 1e3 / v for k, v in m.items() if "/" not in k}
        resize, rest = ms["window+resize"] - ms["window"], ms["pil"] - ms["window+resize"]
        print(f"| {name} | {mode} | {ms['baseline']:.2f} | {ms['pil']:.2f} | {ms['floor']:.2f} | "
              f"{ms['window'] - ms['floor']:.2f} | {resize:.2f} | {rest:.2f} | "
              f"{ms['baseline'] / (ms['floor'] + resize + rest):.2f}x |")
    print()
    cols = [k for k, _ in STAGES] + ["other", "total"]
    print("Where the time goes: ms per image, one profiled pass (cProfile)")
    print()
    print("| corpus | mode | pipeline | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---:|" * len(cols))
    for name, mode, k, t in split:
        print(f"| {name} | {mode} | {k} | " + " | ".join(f"{t[c]:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
