"""CPU decoding per CPU-second: open_clip-style baseline vs the `pil` loader's decoder vs the entropy floor
(issue 15, point 5). In-memory JPEG bytes, so only decoding, cropping, resizing and normalising count.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python benchmarks/bench_decode.py [--rounds 5]

Corpora (all JPEG q90 4:2:0, made by this script):
  generated  ~0.4 MP (768x512 / 512x768) natural-image crops with sensor-like grain (tests/_loader_fixtures.py)
  pattern    ~0.4 MP smooth synthetic patterns (fewer bits per pixel)
  skimage    scikit-image's bundled colour photos at their own sizes (0.14-2 MP)
Modes: fixed 224 (RandomResizedCrop 0.4-1, flip; the draws of aimv2data.loader.geometry) and native
resolution (cover + centre crop to the p=14 grid of ~256 patches with the image's aspect).

Pipelines, one thread, images per CPU-second (process time: other jobs share this machine):
  baseline   open_clip / torchvision style: full decode, crop, bicubic resize, flip, ToTensor, Normalize
  pil-draft  the `pil` decoder before issue 15 (Pillow `draft`), whole batch incl. normalisation
  pil        the `pil` decoder now (libjpeg-turbo scaled decode via simplejpeg + Pillow-SIMD resize)
  floor      libjpeg-turbo decode at 1/8 (Huffman decoding + DC-only IDCT): what any decoder that
             reads every bit must spend; nothing a loader does on top comes free
Rounds alternate the pipelines; figures are medians over rounds.
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


def _jpeg(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90)
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


def ours(turbo: bool):
    from aimv2data.loader.decode_pil import PilDecoder

    dec = PilDecoder(turbo=turbo)

    def run(datas, cs, batch):
        for i in range(0, len(datas), batch):
            sub = list(zip(datas[i:i + batch], cs[i:i + batch]))
            by_size = {}
            for d, c in sub:                       # a batch has one output size (as in the loader)
                by_size.setdefault(c.out, []).append((d, c))
            for group in by_size.values():
                dec.decode_batch([d for d, _ in group], [c for _, c in group], [1] * len(group))
    return run


def floor(datas, cs, batch):
    import simplejpeg

    for d in datas:
        simplejpeg.decode_jpeg(d, "RGB", min_width=1, min_height=1)     # the smallest scale: 1/8


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


def measure(fn, datas, cs, batch) -> float:
    t = time.process_time()
    fn(datas, cs, batch)
    return len(datas) / (time.process_time() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=120, help="Images per corpus.")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--corpora", default="generated,pattern,skimage")
    a = ap.parse_args()
    torch.set_num_threads(1)
    pipes = {"baseline": baseline, "pil-draft": ours(False), "pil": ours(True), "floor": floor}
    load0 = os.getloadavg()[0]
    rows = []
    for name in a.corpora.split(","):
        datas = corpus(name, a.images)
        mp = statistics.mean(Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in datas)
        bpp = statistics.mean(8 * len(d) / (Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1])
                              for d in datas)
        for mode in ("fixed", "native"):
            cs = crops(datas, mode)
            res = {k: [] for k in pipes}
            for _ in range(a.rounds):
                for k, fn in pipes.items():
                    res[k].append(measure(fn, datas, cs, a.batch))
            med = {k: statistics.median(v) for k, v in res.items()}
            rows.append((name, mode, mp / 1e6, bpp, med, fidelity(datas, cs)))
            print(f"[{name} {mode}] " + ", ".join(f"{k} {v:.0f}" for k, v in med.items()), file=sys.stderr, flush=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"Date {datetime.date.today()} · `{cpu}`, {os.cpu_count()} cores shared with other jobs (load "
          f"{load0:.1f} at start, {os.getloadavg()[0]:.1f} at end), affinity {sorted(os.sched_getaffinity(0))}, "
          f"one thread · Python {platform.python_version()}, Pillow-SIMD {Image.__version__} (all pipelines) · "
          f"{a.images} images per corpus, batch {a.batch}, median of {a.rounds} alternating rounds, "
          "images per CPU-second")
    print()
    print("| corpus | mode | MP | bits/px | baseline | `pil` before (draft) | `pil` now | now vs baseline "
          "| before vs baseline | floor (1/8 decode) | floor vs baseline | `pil` now / floor "
          "| diff from full decode, before (mean / max) | now (mean / max) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, mode, mp, bpp, m, f in rows:
        b = m["baseline"]
        print(f"| {name} | {mode} | {mp:.2f} | {bpp:.2f} | {b:.0f} | {m['pil-draft']:.0f} | {m['pil']:.0f} | "
              f"**{m['pil'] / b:.2f}x** | {m['pil-draft'] / b:.2f}x | {m['floor']:.0f} | {m['floor'] / b:.2f}x | "
              f"{m['pil'] / m['floor']:.2f} | {f['pil-draft'][0]:.4f} / {f['pil-draft'][1]:.4f} | "
              f"{f['pil'][0]:.4f} / {f['pil'][1]:.4f} |")


if __name__ == "__main__":
    main()
