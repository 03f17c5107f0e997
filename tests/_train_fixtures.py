"""A real manifest and tokenizer for the trainer tests: the embedded demo corpus (80 photos and
generated scenes with captions) written as one img2dataset-style webdataset tar (webdataset's TarWriter),
indexed by `aimv2 shard`'s build_manifest, a synthetic caption set attached as `syn_demo`, and a
sentencepiece tokenizer trained on it."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}


def build(root: Path, tars: int = 1) -> tuple[Path, Path]:
    """root/manifest and root/tok.model (built once per root); `tars` > 1 splits the corpus over that many
    tars, hence manifest parts (what several ranks need: each reads its own parts)."""
    manifest, tok = root / "manifest", root / "tok.model"
    if (manifest / "_manifest.json").exists() and tok.exists():
        return manifest, tok
    import webdataset as wds

    from aimv2data.demo_corpus import corpus
    from aimv2data.manifest.build import build_manifest
    from aimv2train.train.tokenizer import train_tokenizer

    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    images = list(corpus())
    for t in range(tars):
        with wds.TarWriter(str(shards / f"{t:05d}.tar")) as w:
            for i, im in enumerate(images):
                if i % tars == t:
                    key = f"{i:09d}"
                    w.write({"__key__": key, EXT[im.format]: im.data, "txt": im.caption,
                             "json": json.dumps({"key": key, "status": "success", "url": f"http://demo/{im.name}",
                                                 "width": im.width, "height": im.height, "source": "demo"})})
    build_manifest([str(shards / f"{t:05d}.tar") for t in range(tars)], manifest, progress=False)
    # a synthetic caption set, as `aimv2 caption attach` adds one: list[str] per sample
    for f in sorted((manifest / "samples").glob("*.parquet")):
        df = pl.read_parquet(f)
        syn = [[f"an image: {c}"] if c else None for c in df["caption"].to_list()]
        df.with_columns(pl.Series("syn_demo", syn, dtype=pl.List(pl.String))).write_parquet(f)
    train_tokenizer(manifest, tok, vocab_size=256, soft_limit=True)
    return manifest, tok


def tiny_config(manifest, tok, out, **kw):
    """The trainer tests' small CPU run: tiny model, 56 px, 8 per batch, no workers, no periodic saves;
    `kw` adds to or overrides these fields."""
    from aimv2train.train.trainer import TrainConfig

    base = dict(manifest=str(manifest), tokenizer=str(tok), out=str(out), model="tiny", resolution=56,
                batch_size=8, workers=0, save_every=0, progress=False, peak_flops=1e11)
    return TrainConfig(**{**base, **kw})


def metrics(run) -> list[dict]:
    """A run's metrics.jsonl, one dict per logged step."""
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def signal_on_forward(monkeypatch, n: int, sig: int) -> None:
    """Send `sig` to this process on the n-th call of LossModule.forward (then run the real forward): a
    signal arriving mid-step, as a preemption notice does."""
    import os

    from aimv2train.train import trainer

    real_forward, calls = trainer.LossModule.forward, []

    def forward(self, *args):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), sig)
        return real_forward(self, *args)

    monkeypatch.setattr(trainer.LossModule, "forward", forward)
