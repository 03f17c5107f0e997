"""Synthetic captions: join a caption set into the manifest (`attach`), or make one with a local
image-to-text model (`generate`).

A caption set is a parquet or jsonl file with a key column (uid, url, sha256 or key: whatever both sides
share; e.g. Recap-DataComp-1B's `re_caption` keyed by url or sha256, DataCompDR keyed by uid) and a
caption column of strings or lists of strings. Several rows per key and list columns both mean several
captions per sample. Attached, a set becomes the sample column `syn_<name>` (list[str], null where the
set has no caption for the sample) in every samples part, and an entry in _manifest.json
`caption_sets`, which is what the loader's caption mix reads.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aimv2data.manifest.schema import SYN_PREFIX, SYN_TYPE, read_json, write_json_atomic, write_parquet_atomic

JOIN_KEYS = ("uid", "url", "sha256", "key")


class CaptionError(ValueError):
    """Bad caption set or manifest; the message says what to do."""


def _manifest(path: Path) -> dict:
    meta = path / "_manifest.json"
    if not meta.is_file():
        raise CaptionError(f"{meta} not found: build the manifest with `aimv2 shard` first")
    return read_json(meta)


def _sample_parts(path: Path) -> list[Path]:
    parts = sorted((path / "samples").glob("*.parquet"))
    if not parts:
        raise CaptionError(f"{path}/samples has no parquet parts; build the manifest with `aimv2 shard` first")
    return parts


def read_caption_set(file: str | Path, key_column: str, column: str) -> tuple[pa.Array, pa.Array, int]:
    """(keys as string, captions as list<string> per key, rows read). Null/blank captions are dropped,
    exact duplicates per key are kept once, order is kept."""
    import polars as pl

    file = Path(file)
    if not file.is_file():
        raise CaptionError(f"caption set {file} not found")
    suffix = "".join(file.suffixes[-2:]).lower()
    if suffix.endswith(".parquet"):
        names = pl.read_parquet_schema(file)
        _need(file, names, key_column, column)
        df = pl.read_parquet(file, columns=[key_column, column])
    elif suffix.endswith((".jsonl", ".ndjson", ".json")):
        df = pl.read_ndjson(file, infer_schema_length=None)
        _need(file, df.columns, key_column, column)
        df = df.select(key_column, column)
    else:
        raise CaptionError(f"{file}: caption sets are .parquet or .jsonl files")
    rows = df.height
    df = df.rename({key_column: "_k", column: "_c"})
    if isinstance(df.schema["_c"], pl.List):
        df = df.explode("_c")
    df = (df.with_columns(pl.col("_k").cast(pl.String), pl.col("_c").cast(pl.String).str.strip_chars())
            .filter(pl.col("_k").is_not_null() & pl.col("_c").is_not_null() & (pl.col("_c") != ""))
            .unique(maintain_order=True)
            .group_by("_k", maintain_order=True).agg(pl.col("_c")))
    t = df.to_arrow()
    return t["_k"].combine_chunks().cast(pa.string()), t["_c"].combine_chunks().cast(SYN_TYPE), rows


def _need(file, names, *cols):
    missing = [c for c in cols if c not in names]
    if missing:
        raise CaptionError(f"{file}: no column(s) {missing}; it has {list(names)} "
                           "(choose with --column, and --key-column when the key is named differently)")


def attach(manifest: str | Path, captions: str | Path, on: str, column: str, name: str | None = None,
           key_column: str | None = None) -> dict:
    """Join a caption set into every samples part as `syn_<name>`; returns matched/unmatched counts."""
    manifest = Path(manifest)
    meta = _manifest(manifest)
    if on not in JOIN_KEYS:
        raise CaptionError(f"--on must be one of {', '.join(JOIN_KEYS)}, got {on!r}")
    name = name or column
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise CaptionError(f"caption set name {name!r}: use lower-case letters, digits and _ (it becomes "
                           f"the column {SYN_PREFIX}<name>); pass --name")
    col = SYN_PREFIX + name
    keys, lists, rows_read = read_caption_set(captions, key_column or on, column)
    used = np.zeros(len(keys), dtype=bool)
    matched = total = n_captions = 0
    for part in _sample_parts(manifest):
        t = pq.read_table(part)
        idx = pc.index_in(t[on].cast(pa.string()), value_set=keys)
        syn = lists.take(idx)
        if col in t.column_names:   # re-attaching a set replaces it
            t = t.drop_columns([col])
        t = t.append_column(pa.field(col, SYN_TYPE), syn)
        write_parquet_atomic(t, part)
        hit = idx.drop_null().to_numpy()
        used[hit] = True
        matched += len(hit)
        total += t.num_rows
        n_captions += int(pc.sum(pc.list_value_length(syn)).as_py() or 0)
    report = {"name": name, "column": col, "file": str(Path(captions).resolve()), "on": on,
              "key_column": key_column or on, "file_column": column, "rows_read": rows_read,
              "keys": len(keys), "matched_rows": matched, "unmatched_rows": total - matched,
              "captions": n_captions, "unused_keys": int((~used).sum()),
              "attached": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta = _manifest(manifest)   # re-read: keep whatever changed meanwhile
    meta.setdefault("caption_sets", {})[name] = report
    meta.get("caption_sets_incomplete", {}).pop(name, None)
    write_json_atomic(meta, manifest / "_manifest.json")
    return report


# --- generate --------------------------------------------------------------------------------------

def _load_captioner(model_path: str, device: str):
    """A local HF image-to-text model (VisionEncoderDecoder, BLIP, GIT, ...) with its image processor and
    tokenizer. Never touches the network."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    if not Path(model_path).is_dir():
        raise CaptionError(f"--model {model_path}: not a folder; pass a local model saved with save_pretrained "
                           "(config, weights, image processor and tokenizer)")
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True)
        try:
            proc = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        except Exception:
            proc = None
        if proc is not None and hasattr(proc, "image_processor") and hasattr(proc, "batch_decode"):
            images, decode = proc.image_processor, proc.batch_decode
        else:
            images = AutoImageProcessor.from_pretrained(model_path, local_files_only=True)
            decode = AutoTokenizer.from_pretrained(model_path, local_files_only=True).batch_decode
    except (OSError, ValueError, KeyError, TypeError) as e:  # not a (complete) image-to-text model
        raise CaptionError(f"--model {model_path} is not an image-to-text captioner transformers can load "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:150]}); pass a folder saved with "
                           "save_pretrained (config, weights, image processor, tokenizer)") from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), images, decode, device


def _open_image(f, offset: int, size: int):
    import io

    from PIL import Image, ImageOps

    f.seek(offset)
    im = Image.open(io.BytesIO(f.read(size)))
    return ImageOps.exif_transpose(im).convert("RGB")


def generate(manifest: str | Path, model: str, *, output: str | Path | None = None, name: str = "caption",
             batch_size: int = 16, max_new_tokens: int = 30, num_beams: int = 1, device: str = "auto",
             limit: int | None = None, progress: bool = True) -> dict:
    """Caption every sample of the manifest; write a caption set (key, uid, url, sha256, <name>, model).
    Work is saved per samples part in OUTPUT.parts/, so an interrupted run resumes."""
    import polars as pl
    import torch
    from tqdm import tqdm

    manifest = Path(manifest)
    _manifest(manifest)
    parts = _sample_parts(manifest)
    output = Path(output) if output else manifest / "captions" / f"{Path(model).name}.parquet"
    if output.suffix not in (".parquet", ".jsonl"):
        raise CaptionError(f"--output {output}: write a .parquet or .jsonl caption set")
    work = output.with_name(output.name + ".parts")
    net, images, decode, device = _load_captioner(model, device)  # first: a refused model leaves no folder
    work.mkdir(parents=True, exist_ok=True)

    cols = ["key", "uid", "url", "sha256", "shard", "offset", "size"]
    n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    todo = min(n_rows, limit) if limit else n_rows
    bar = tqdm(total=todo, unit="img", desc="caption", disable=not progress, dynamic_ncols=True)
    done = failed = 0
    failures = []
    for part in parts:
        if limit and done >= limit:
            break
        target = work / part.name
        df = pl.read_parquet(part, columns=cols)
        if limit:
            df = df.head(limit - done)
        if target.is_file():
            done += df.height
            bar.update(df.height)
            continue
        texts: list[str | None] = []
        for start in range(0, df.height, batch_size):
            chunk = df.slice(start, batch_size)
            ims, ok = [], []
            for r in chunk.iter_rows(named=True):
                shard = Path(r["shard"]) if Path(r["shard"]).is_absolute() else manifest / r["shard"]
                try:
                    with open(shard, "rb") as f:
                        ims.append(_open_image(f, r["offset"], r["size"]))
                    ok.append(True)
                except Exception as e:   # skipped, counted, named
                    ok.append(False)
                    failures.append(f"{r['key']} ({shard}): {type(e).__name__}: {e}")
            out = []
            if ims:
                pixels = images(images=ims, return_tensors="pt")
                with torch.inference_mode():
                    ids = net.generate(**{k: v.to(device) for k, v in pixels.items()},
                                       max_new_tokens=max_new_tokens, num_beams=num_beams)
                out = [t.strip() for t in decode(ids, skip_special_tokens=True)]
            it = iter(out)
            texts += [next(it) if good else None for good in ok]
            failed += ok.count(False)
            done += len(ok)
            bar.update(len(ok))
        res = df.select("key", "uid", "url", "sha256").with_columns(
            pl.Series(name, texts, dtype=pl.String), pl.lit(Path(model).name).alias("model"))
        write_parquet_atomic(res.filter(pl.col(name).is_not_null()).to_arrow(), target)
    bar.close()

    merged = pl.concat([pl.read_parquet(p) for p in sorted(work.glob("*.parquet"))]) if any(work.glob("*.parquet")) \
        else pl.DataFrame(schema={"key": pl.String, "uid": pl.String, "url": pl.String, "sha256": pl.String,
                                  name: pl.String, "model": pl.String})
    tmp = output.with_name(f".{output.name}.tmp")
    if output.suffix == ".jsonl":
        merged.write_ndjson(tmp)
    else:
        merged.write_parquet(tmp)
    tmp.replace(output)
    for p in work.glob("*.parquet"):
        p.unlink()
    work.rmdir()
    return {"output": str(output), "captioned": merged.height, "failed": failed, "failures": failures[:20],
            "model": str(model), "device": device, "column": name}
