"""`aimv2 preview`: look at what the loader feeds the model, as PNG pages and an index.html.

Batches are made by the real loader (`Loader.maker.make(i)`, step i of the loader's current segment: the
same sampler, rank share, source mixture, crops, decoder and caption choice as training; iterating the
loader yields exactly these batches), then de-normalised for display. Steps are taken in training order
from the loader's segment `segment` on (`Loader.segment`: a stretch of steps in which no source stream
changes epoch; 0 is the first). Two kinds of page:

- contact sheets (`batch_e{segment}_s{step}.png`), one per previewed step: each image exactly as the model
  gets it (crop, resize, flip), with the patch grid drawn over it, and per image its source, aspect
  bucket, key, the share of the source the crop kept, the flip, how much a small source was upscaled,
  and the caption chosen (with which caption set it came from);
- a page per area A (`area_{A}.png`): one step at that area (paper §2.4: A = 2^n patches, B = C / A
  images) shown as the patch budget C it fills: every image of the step drawn at a few pixels per
  patch, the bar of used / unused patches, and for every bucket the grid h x w the area gives it and
  the share h*w / A of the area that grid uses.

Fixed resolution (no --native-res) has one area, (R / p)^2, and full batches.
"""
from __future__ import annotations

import html
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write, write_json_atomic, write_text_atomic
from .batch import Batch
from .loader import Loader
from .loader.sampler import ALL, StepSpec
from .loader.samples import AREAS


@dataclass
class Shown:
    """One previewed step: the batch and, per image, what the annotation says."""
    batch: Batch
    budget: int                  # C, patches per rank per step
    bucket: int                  # the step's bucket (-1: fixed resolution, several)
    notes: list[dict]            # per image: source, bucket, aspect, key, kept, flip, caption, kind
    stream: str = ""             # the mixture's source stream the step was drawn from ("" : one stream of all rows)


def _annotate(loader: Loader, spec: StepSpec, batch: Batch) -> list[dict]:
    """Per image: recomputed from the step's spec and the rank's share table, as `StepMaker.make` does."""
    t = loader.maker.tables[spec.source]
    notes = []
    for i, key in enumerate(batch.keys):
        row = int(spec.rows[i])
        if t.key(row) != key:  # the loader replaced a sample that failed to decode
            notes.append({"key": key, "source": batch.sources[i], "bucket": None, "aspect": None, "kept": None,
                          "flip": None, "caption": batch.captions[i], "kind": "?", "replaced": True})
            continue
        crop = loader.maker.crop(spec, row)
        x0, y0, x1, y1 = crop.box
        texts = t.texts(row)
        _, kind = loader.maker.captions.choose(spec.source_epoch, t.uid(row), texts.get("source"), texts.get("caption"),
                                               {c: texts[c] for c in t.syn_columns})
        b = int(t.bucket[row])
        notes.append({"key": key, "source": batch.sources[i], "bucket": b, "aspect": t.buckets[b].aspect,
                      "kept": (x1 - x0) * (y1 - y0) / (crop.src[0] * crop.src[1]), "flip": crop.flip,
                      "upscale": crop.out[0] / (x1 - x0),
                      "src": crop.src, "caption": batch.captions[i], "kind": kind, "replaced": False})
    return notes


def _goto(loader: Loader, segment: int) -> None:
    """Move a loader forward to the start of `segment` (no decoding: the sampler replays the plans)."""
    if segment < loader.segment:
        raise ValueError(f"--segment {segment}: the loader is already at segment {loader.segment}")
    while loader.segment < segment:
        loader._next_segment()   # what `iter(loader)` does after a segment's last step


def _steps_by_area(loader: Loader) -> dict[int, list[int]]:
    """area -> the steps (indices into the loader's current segment) at that area, in order."""
    out: dict[int, list[int]] = {}
    for i, a in enumerate(loader.maker.plan[:, 0].tolist()):
        out.setdefault(int(a), []).append(i)
    return dict(sorted(out.items()))


def _show(loader: Loader, i: int) -> Shown:
    """Step i of the loader's current segment: the batch the loader yields there, annotated."""
    batch = loader.maker.make(i)
    spec = loader.maker.spec(i)
    stream = "" if spec.source == ALL else loader.manifest.sources.get(spec.source, spec.source)
    return Shown(batch, loader.budget, int(spec.bucket), _annotate(loader, spec, batch), stream)


def _pixels(batch: Batch, n: int | None = None) -> np.ndarray:
    """(n, H, W, 3) uint8: the images as the decoder made them (the model normalises them)."""
    return batch.images[:n].cpu().permute(0, 2, 3, 1).numpy()


def _headline(s: Shown) -> str:
    b = s.batch
    h, w = b.grid
    used = len(b) * h * w
    area = b.area or h * w
    exp = f" = 2^{int(math.log2(area))}" if area & (area - 1) == 0 else ""
    src = f"source {s.stream} (its epoch {b.source_epoch})" if s.stream else f"epoch {b.source_epoch}"
    return (f"step {b.global_step}, {src}: area A = {area}{exp} patches, grid {h} x {w} = {h * w} per image, "
            f"{len(b)} images x {h * w} = {used} of C = {s.budget} patches ({100 * used / s.budget:.1f}%)")


def contact_sheet(s: Shown, path: Path, per_sheet: int = 16) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = s.batch
    n = min(per_sheet, len(b))
    imgs = _pixels(b, n)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    H, W = imgs.shape[1:3]
    cell_w = max(2.4, min(3.6, 5.5 * W / H))  # tall images: narrower cells, so a sheet stays on a screen
    cell_h = cell_w * H / W + 1.2  # room for the text above and under the image
    chars = int(cell_w * 19)  # characters per title line at 6.5 pt
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell_w, rows * cell_h + 0.5), squeeze=False,
                             layout="constrained")
    p = b.patch_size
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(imgs[k], interpolation="lanczos" if max(H, W) > 300 else "nearest")
        for x in range(p, W, p):  # the patch grid the encoder cuts
            ax.axvline(x - 0.5, color="white", lw=0.3, alpha=0.45)
        for y in range(p, H, p):
            ax.axhline(y - 0.5, color="white", lw=0.3, alpha=0.45)
        note = s.notes[k]
        if note["replaced"]:
            top = f"{note['source']} | replacement {note['key']}"
            mid = "(a sample that failed to decode was replaced)"
        else:
            top = f"{note['source']} | bucket {note['bucket']} (w/h {note['aspect']:.2f}) | {note['key']}"
            mid = (f"source {note['src'][0]}x{note['src'][1]} px, crop keeps {100 * note['kept']:.0f}%"
                   + (", flipped" if note["flip"] else "") + f" -> {W}x{H} px"
                   + (f" (upscaled {note['upscale']:.1f}x)" if note["upscale"] > 1.05 else "")
                   + f", {H // p}x{W // p} patches")
        cap = textwrap.shorten(note["caption"] or "(no caption)", 150, placeholder=" ...")
        cap = "\n".join(textwrap.wrap(f"[{note['kind']}] {cap}", int(chars * 0.8))[:4])
        ax.set_title("\n".join(textwrap.wrap(top, chars) + textwrap.wrap(mid, chars)), fontsize=6.5, loc="left")
        ax.text(0, -0.03, cap, transform=ax.transAxes, fontsize=7, va="top", ha="left", wrap=True)
    more = f"; showing {n} of {len(b)}" if n < len(b) else ""
    fig.suptitle(_headline(s) + more, fontsize=10, x=0.01, ha="left")
    _save(fig, path)
    plt.close(fig)
    return path


def area_page(s: Shown, loader: Loader, path: Path) -> Path:
    """How one step at this area fills the patch budget C."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = s.batch
    h, w = b.grid
    canvas, scale = _mosaic(b)
    fig = plt.figure(figsize=(15, 8.2))
    gs = fig.add_gridspec(2, 2, width_ratios=(1.25, 1), height_ratios=(12, 1), hspace=0.25, wspace=0.18)
    used = len(b) * h * w
    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_title(f"the step's {len(b)} images, each {h} x {w} patches, drawn at {scale} px per patch "
                 f"(together {used} patches)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    _draw_budget(fig.add_subplot(gs[1, 0]), b, s.budget)
    _draw_bucket_grids(fig.add_subplot(gs[:, 1]), s, loader)
    fig.suptitle(_headline(s), fontsize=11, x=0.01, ha="left")
    _save(fig, path)
    plt.close(fig)
    return path


def _mosaic(b) -> tuple[np.ndarray, int]:
    """The step's images side by side in a near-square mosaic, and the canvas pixels per patch."""
    import torch
    import torch.nn.functional as F

    h, w = b.grid
    per_row = max(1, round(math.sqrt(len(b) * h / w)))
    n_rows = math.ceil(len(b) / per_row)
    scale = max(1, min(8, 900 // max(per_row * w, n_rows * h)))  # pixels per patch on the canvas
    canvas = np.full((n_rows * h * scale, per_row * w * scale, 3), 235, np.uint8)
    tiles = F.interpolate(b.images.float().cpu(), size=(h * scale, w * scale), mode="bilinear", antialias=True,
                          align_corners=False).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, tile in enumerate(tiles):
        r, q = divmod(i, per_row)
        canvas[r * h * scale:(r + 1) * h * scale, q * w * scale:(q + 1) * w * scale] = tile
    return canvas, scale


def _draw_budget(bar, b, c: int) -> None:
    """The budget C as a bar: the patches the images use, one segment per image, and what is left."""
    h, w = b.grid
    used = len(b) * h * w
    bar.barh(0, used, color="#3b75af", height=0.6)
    for i in range(1, min(len(b), 256)):  # image boundaries (up to 256 of them stay legible)
        bar.axvline(i * h * w, color="white", lw=0.4)
    bar.barh(0, c - used, left=used, color="#cccccc", height=0.6)
    bar.set_xlim(0, c)
    bar.set_yticks([])
    bar.set_xlabel(f"patch budget C = {c}: {len(b)} images x {h * w} = {used} used ({100 * used / c:.1f}%), "
                   f"{c - used} unused", fontsize=9)


def _draw_bucket_grids(right, s: Shown, loader: Loader) -> None:
    """Native resolution: how much of the area A each bucket's grid uses; fixed: the one size."""
    b = s.batch
    h, w = b.grid
    area = b.area or h * w
    bk = loader.manifest.buckets
    buckets = sorted({k for g in loader.maker.groups.values() for k, rows in g.items() if len(rows)})
    if not loader.cfg.native_res:
        right.axis("off")
        right.text(0, 0.9, f"fixed resolution: every image {w * b.patch_size} x {h * b.patch_size} px,\n"
                           f"{h} x {w} patches, {len(b)} per step", fontsize=11, va="top")
        return
    aspects = [bk[k].aspect for k in buckets]
    fills = [bk[k].grids[area][0] * bk[k].grids[area][1] / area for k in buckets]
    colors = ["#d95f02" if k == s.bucket else "#7f9fbf" for k in buckets]
    right.bar(range(len(buckets)), fills, color=colors)
    right.set_xticks(range(len(buckets)))
    right.set_xticklabels([f"{a:.2f}: {bk[k].grids[area][0]} x {bk[k].grids[area][1]}"
                           for k, a in zip(buckets, aspects)], fontsize=7, rotation=90)
    right.set_ylim(0, 1.05)
    right.set_ylabel("h*w / A: the share of the area the grid uses")
    right.set_xlabel("bucket w/h and its grid h x w at this area (orange: this step's bucket)")
    right.set_title(f"A = {area}: the grid of every bucket this rank reads", fontsize=9)
    right.grid(axis="y", alpha=0.3)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _index(out: Path, manifest: str, sheets: list[tuple[Path, Shown]], areas: list[tuple[Path, Shown]],
           settings: dict) -> Path:
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in settings.items())
    parts = [f"<!doctype html><meta charset='utf-8'><title>aimv2 preview: {e(manifest)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1500px}img{max-width:100%;border:1px solid #ccc}"
             "td{padding:2px 10px}</style>",
             f"<h1>What the loader feeds the model: {e(manifest)}</h1><table>{rows}</table>",
             "<h2>Batches</h2><p>Each image as the model gets it (crop, resize, flip), de-normalised, with the "
             "patch grid; per image its source, aspect bucket, crop and the caption chosen.</p><ul>"]
    parts += [f"<li><a href='#{p.stem}'>{e(_headline(s))}</a></li>" for p, s in sheets]
    parts.append("</ul><h2>Areas</h2><p>One step per area: how its images fill the patch budget C.</p><ul>")
    parts += [f"<li><a href='#{p.stem}'>A = {s.batch.area or s.batch.grid[0] * s.batch.grid[1]}: "
              f"{e(_headline(s))}</a></li>" for p, s in areas]
    parts.append("</ul>")
    for p, _s in sheets + areas:
        parts.append(f"<h3 id='{p.stem}'>{e(p.name)}</h3><a href='{p.name}'><img src='{p.name}'></a>")
    path = out / "index.html"
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path


def _areas_made(loader: Loader) -> set[int]:
    """Every area the loader can draw: 2^7..2^12 (native resolution) or (R / p)^2 (fixed)."""
    return set(AREAS) if loader.cfg.native_res else {loader.sampler.area(0)}


def preview(manifest: str | os.PathLike, out: str | os.PathLike, *, batches: int = 4, per_sheet: int = 16,
            areas: list[int] | None = None, segment: int = 0, area_pages: bool = True, scan: int = 1024,
            **loader_kwargs) -> dict:
    """Write contact sheets of the first `batches` steps from the loader's segment `segment` on (those at
    `areas` when given), a page per area (the first step at it), and index.html into `out`. Steps are
    taken in the order `iter(loader)` yields them, across segments, looking at most `scan` steps ahead
    (the sampler replays them; only the shown steps are decoded). `loader_kwargs` are Loader's
    (native_res, batch_patches, resolution, batch_size, seed, mix, rank, world_size, decoder, ...).
    Returns {"index", "sheets", "areas", ...}."""
    loader = Loader(str(manifest), workers=0, **loader_kwargs)
    made = _areas_made(loader)
    if areas:
        bad = sorted(set(areas) - made)
        if bad:
            raise ValueError(f"--areas {bad}: the loader makes no step at that area with these settings (it "
                             f"draws {', '.join(map(str, sorted(made)))})")
    want = set(areas) if areas else made
    _goto(loader, segment)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = loader.maker.snap.t
    sheets, first, counts = [], {}, {}
    while True:
        for i, a in enumerate(loader.maker.plan[:, 0].tolist()):
            counts[a] = counts.get(a, 0) + 1
            if a not in want or (len(sheets) >= batches and (a in first or not area_pages)):
                continue
            s = _show(loader, i)
            if len(sheets) < batches:
                sheets.append((contact_sheet(s, out / f"batch_e{segment}_s{s.batch.global_step:05d}.png", per_sheet), s))
            if area_pages and a not in first:
                first[a] = s
        scanned = loader.maker.snap.t + len(loader) - t0
        if (len(sheets) >= batches and (not area_pages or set(first) == want)) or scanned >= scan:
            break
        loader._next_segment()
    if areas and area_pages and set(first) != want:
        raise ValueError(f"--areas {sorted(want - set(first))}: no step at that area in the {scanned} steps from "
                         f"segment {segment} on (they have areas {', '.join(map(str, sorted(counts)))}); raise --scan")
    pages = [(area_page(s, loader, out / f"area_{a:04d}.png"), s) for a, s in sorted(first.items())]
    mode = "native resolution" if loader.cfg.native_res else f"fixed resolution {loader.cfg.resolution} px"
    settings = {"manifest": str(manifest), "mode": mode, "patch budget C": loader.budget,
                "seed": loader.cfg.seed, "rank / world size": f"{loader.rank} / {loader.world_size}",
                "mix": ", ".join(f"{loader._name(k)} {w:.3f}" for k, w in loader.weights.items()),
                "from loader segment": segment, "steps scanned": f"{scanned} (global steps {t0}..{t0 + scanned - 1})",
                "steps per area": ", ".join(f"A={a}: {n}" for a, n in sorted(counts.items()))}
    index = _index(out, str(manifest), sheets, pages, settings)
    summary = {"index": str(index), "sheets": [str(p) for p, _ in sheets], "areas": [str(p) for p, _ in pages],
               "settings": settings}
    write_json_atomic(summary, out / "preview.json", indent=2)
    return summary
