"""A small generated labelled image set for the probe and export tests, and a briefly trained trunk.

Four texture classes whose colours are drawn at random per image (foreground and background), so the
mean colour of an image says nothing about its class: horizontal stripes, vertical stripes, diagonal
stripes and a checkerboard, each with a random period, phase and a little noise. What separates them is
the orientation structure inside the patches.

Plus a colour set (red / green / blue / yellow blobs on grey): there the label is in the mean colour,
which any trunk, even a random one, passes to the probe: a check of the plumbing, not of learning.

    make_image_folder(root)  -> root/train/<class>/*.png (20 each), root/val/<class>/*.png (10 each)
    make_manifest(root)      -> a webdataset tar of such images indexed by `aimv2 shard`'s build_manifest,
                                with a `label` column added (the last row's label null)
    trained_trunk(root)      -> RUN directory of the real trainer (tiny model, 56 px) on a fresh draw of
                                texture images whose alt-text names the texture
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from aimv2data.demo_corpus import pattern_image

CLASSES = ("checker", "diagonal", "horizontal", "vertical")
SIZE = 56


def texture(kind: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """The demo corpus' pattern family (aimv2data.demo_corpus.pattern_image): the trunk the demo trains and
    the one these tests train see the same kind of images."""
    return pattern_image(kind, rng, size)


COLOURS = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40), "yellow": (230, 220, 40)}


def colour(kind: str, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx, r = rng.uniform(14, size - 14, 2).tolist() + [rng.uniform(10, 20)]
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    img = np.where(blob[..., None], np.array(COLOURS[kind], float), rng.uniform(90, 160))
    img = img + rng.normal(0, 10, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def samples(n_per_class: int, seed: int, kind: str = "texture"):
    """[(class, uint8 image)] in class-major order, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    if kind == "colour":
        return [(c, colour(c, rng)) for c in COLOURS for _ in range(n_per_class)]
    return [(c, texture(c, rng)) for c in CLASSES for _ in range(n_per_class)]


def make_image_folder(root: Path, n_train: int = 20, n_val: int = 10, kind: str = "texture") -> tuple[Path, Path]:
    root = Path(root)
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        for i, (c, img) in enumerate(samples(n, seed, kind)):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.png")
    return root / "train", root / "val"


CAPTIONS = {"checker": "a checkerboard pattern", "diagonal": "diagonal stripes", "horizontal": "horizontal stripes",
            "vertical": "vertical stripes"}


def write_tar(path: Path, items, caption_style: str = "names") -> Path:
    """items [(class, image)] -> an img2dataset-style webdataset tar (webdataset's TarWriter), with
    alt-text that names the texture ("names", what real alt-text would say) or one class-free caption
    for every image ("neutral")."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for i, (c, img) in enumerate(items):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            key = f"{i:09d}"
            sample = {"__key__": key, "png": buf.getvalue(),
                      "json": json.dumps({"key": key, "status": "success", "width": SIZE, "height": SIZE,
                                          "source": "probe"})}
            sample["txt"] = CAPTIONS[c] if caption_style == "names" else "a picture of a pattern"
            w.write(sample)
    return path


def make_manifest(root: Path, n: int = 6, seed: int = 3, null_label_rows: int = 1) -> Path:
    """A manifest of 4*n images with a `label` column (class name); the last `null_label_rows` rows
    get a null label."""
    import polars as pl

    from aimv2data.manifest.build import build_manifest

    items = samples(n, seed)
    tar = write_tar(Path(root) / "shards" / "00000.tar", items)
    manifest = Path(root) / "manifest"
    build_manifest([str(tar)], manifest, progress=False)
    for f in sorted((manifest / "samples").glob("*.parquet")):
        df = pl.read_parquet(f)
        labels = [items[int(k)][0] for k in df["key"].to_list()]
        labels[len(labels) - null_label_rows:] = [None] * null_label_rows
        df.with_columns(pl.Series("label", labels, dtype=pl.String)).write_parquet(f)
    return manifest


def trained_trunk(root: Path, steps: int = 60, seed: int = 0, caption_style: str = "names", n_per_class: int = 40,
                  lr: float | None = None, batch_size: int = 16) -> Path:
    """The real trainer (tiny model, 56 px, --lr default or `lr`) for `steps` steps on 4 x `n_per_class`
    texture images: a fresh draw (seed 100 + seed), not the probe's images, whose alt-text names the texture
    (`caption_style="names"`, image-text pre-training) or is one class-free caption for all ("neutral":
    only the pixel objective can teach the trunk anything). The labels themselves are never used."""
    from aimv2data.manifest.build import build_manifest
    from aimv2train.train.tokenizer import train_tokenizer
    from aimv2train.train.trainer import TrainConfig, train

    root = Path(root)
    run = root / "run"
    if (run / "summary.json").is_file():
        return run
    tar = write_tar(root / "pretrain_shards" / "00000.tar", samples(n_per_class, seed=100 + seed), caption_style)
    manifest = root / "pretrain_manifest"
    build_manifest([str(tar)], manifest, progress=False)
    tok = root / "tok.model"
    train_tokenizer(manifest, tok, vocab_size=64, soft_limit=True)
    train(TrainConfig(manifest=str(manifest), tokenizer=str(tok), out=str(run), model="tiny", steps=steps,
                      resolution=SIZE, batch_size=batch_size, lr=lr, workers=0, save_every=0, progress=False,
                      peak_flops=1e11, seed=seed))
    return run
