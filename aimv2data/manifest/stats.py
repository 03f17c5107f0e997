"""What is in a manifest: counts per source and bucket, image sizes and aspects, caption coverage and
length, rejects by reason. Numbers as a dict (and text via the CLI), plots as PNGs."""
from __future__ import annotations


import math
from pathlib import Path

import numpy as np

from aimv2data.manifest import layout
from aimv2data.manifest.integrity import check_rows, open_meta, read_part, read_schema, sample_parts
from aimv2data.manifest.schema import SYN_PREFIX

ASPECT_BINS = np.linspace(-3, 3, 25)   # log2(w/h) in quarter-octave bins: 1:8 .. 8:1


def _pct(a, qs=(5, 25, 50, 75, 95)) -> dict:
    if len(a) == 0:
        return {f"p{q}": None for q in qs}
    v = np.percentile(a, qs)
    return {f"p{q}": round(float(x), 3) for q, x in zip(qs, v)}


_COLUMNS = ("source", "format", "mode", "bucket", "width", "height", "orientation", "caption")


def _read(path):
    names = read_schema(path)
    return read_part(path, [c for c in names if c in _COLUMNS or c.startswith(SYN_PREFIX)])


def _counts(df, col) -> dict:
    """{value: rows}, most common first."""
    if df.height == 0 or col not in df.columns:
        return {}
    return {str(k): v for k, v in df.group_by(col).len().sort("len", descending=True).iter_rows()}


def compute_stats(manifest: str | Path) -> dict:
    import polars as pl

    from aimv2data.storage import upath

    manifest = upath(manifest)                 # a local directory or a URL
    meta = open_meta(manifest)   # a store that does not answer is said so, not "not found"
    samples = sample_parts(manifest, meta)
    rejects = layout.reject_files(manifest)
    s = pl.concat([_read(p) for p in samples], how="diagonal_relaxed") if samples else pl.DataFrame()
    r = pl.concat([read_part(p, ["reason", "source"]) for p in rejects]) if rejects else pl.DataFrame()
    n = s.height
    check_rows(manifest, meta, n)

    out = {"manifest": str(manifest), "samples": n, "rejects": r.height,
           "per_source": _counts(s, "source"), "per_format": _counts(s, "format"), "per_mode": _counts(s, "mode"),
           "per_reason": _counts(r, "reason"), "rejects_per_source": _counts(r, "source")}
    buckets = {b["id"]: b for b in meta.get("buckets", [])}
    per_bucket = {int(k): v for k, v in _counts(s, "bucket").items()}
    out["per_bucket"] = [{"bucket": b, "aspect": buckets[b]["aspect"], "samples": per_bucket.get(b, 0),
                          "share": round(per_bucket.get(b, 0) / n, 4) if n else 0.0} for b in sorted(buckets)]
    if n:
        w, h = s["width"].to_numpy().astype(np.float64), s["height"].to_numpy().astype(np.float64)
        hist, _ = np.histogram(np.clip(np.log2(w / h), -3, 3), bins=ASPECT_BINS)
        out["size"] = {"width": _pct(w), "height": _pct(h), "megapixels": _pct(w * h / 1e6),
                       "shorter_side": _pct(np.minimum(w, h)), "longer_side": _pct(np.maximum(w, h))}
        out["aspect_hist"] = {"log2_edges": ASPECT_BINS.round(3).tolist(), "counts": hist.tolist()}
        out["rotated_by_exif"] = int((s["orientation"] >= 5).sum()) if "orientation" in s.columns else 0
    caps = out["captions"] = _caption_stats(s)
    out["caption_sets"] = meta.get("caption_sets", {})
    out["_arrays"] = {"width": s["width"].to_numpy() if n else np.array([]),
                      "height": s["height"].to_numpy() if n else np.array([]),
                      "caption_words": {c: (s[c].drop_nulls() if c == "caption" else s[c].explode().drop_nulls())
                                        .str.split(" ").list.len().to_numpy() for c in caps}}
    return out


def _caption_stats(s) -> dict:
    """Coverage and length of the alt-text `caption` and of each attached syn_* caption set."""
    n, caps = s.height, {}
    for col in ["caption"] + sorted(c for c in s.columns if c.startswith(SYN_PREFIX)):
        if col not in s.columns:
            continue
        if col == "caption":
            texts = s[col].drop_nulls()
            covered = texts.len()
            per_row = 1.0
        else:
            lists = s[col]
            covered = int((lists.list.len().fill_null(0) > 0).sum())
            per_row = float(lists.drop_nulls().list.len().mean() or 0.0)
            texts = lists.explode().drop_nulls()
        chars = texts.str.len_chars().to_numpy()
        words = texts.str.split(" ").list.len().to_numpy()
        caps[col] = {"coverage": round(covered / n, 4) if n else 0.0, "samples": covered,
                     "captions_per_sample": round(per_row, 3), "chars": _pct(chars, (5, 50, 95)),
                     "words": _pct(words, (5, 50, 95)),
                     "mean_words": round(float(words.mean()), 2) if len(words) else None}
    return caps


def plot_stats(stats: dict, out_dir: str | Path) -> list[Path]:
    """buckets.png, sizes.png, aspects.png, captions.png in out_dir."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []

    def save(fig, name):
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)

    pb = stats["per_bucket"]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar([b["bucket"] for b in pb], [b["samples"] for b in pb], color="tab:blue")
    ax.set_xticks([b["bucket"] for b in pb][::2], [f"{b['aspect']:.2f}" for b in pb][::2], rotation=60, fontsize=7)
    ax.set_xlabel("bucket aspect (w/h)")
    ax.set_ylabel("samples")
    ax.set_title(f"samples per aspect bucket ({stats['samples']} total)")
    save(fig, "buckets.png")

    w, h = stats["_arrays"]["width"], stats["_arrays"]["height"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if len(w):
        mp = w * h / 1e6
        axes[0].hist(mp, bins=np.logspace(math.log10(max(mp.min(), 1e-4)), math.log10(mp.max() * 1.01 + 1e-9), 30))
        axes[0].set_xscale("log")
        axes[1].hist(np.minimum(w, h), bins=30)
    axes[0].set_xlabel("megapixels (display)")
    axes[1].set_xlabel("shorter side (px)")
    for ax in axes:
        ax.set_ylabel("samples")
    save(fig, "sizes.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    if "aspect_hist" in stats:
        e = np.asarray(stats["aspect_hist"]["log2_edges"])
        ax.bar(e[:-1], stats["aspect_hist"]["counts"], width=np.diff(e), align="edge", color="tab:green")
    ax.set_xlabel("log2(width / height)  (0 = square, 1 = 2:1)")
    ax.set_ylabel("samples")
    save(fig, "aspects.png")

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for col, words in stats["_arrays"]["caption_words"].items():
        if len(words):
            ax.hist(np.clip(words, 0, 100), bins=np.arange(0, 102, 2), alpha=0.5,
                    label=f"{col} ({100 * stats['captions'][col]['coverage']:.0f}% of samples)")
    ax.set_xlabel("caption length (words, clipped at 100)")
    ax.set_ylabel("captions")
    if stats["_arrays"]["caption_words"]:
        ax.legend(fontsize=8)
    save(fig, "captions.png")
    return files
