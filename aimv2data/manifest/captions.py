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
import pyarrow.parquet as pq

from aimv2data import storage
from aimv2data.manifest import layout
from aimv2data.manifest.integrity import ManifestMismatch, read_meta
from aimv2data.manifest.schema import (MAX_CAPTION_BYTES, SYN_PREFIX, SYN_TYPE, read_json, write_json_atomic,
                                       write_parquet_atomic)

JOIN_KEYS = ("uid", "url", "sha256", "key")


class CaptionError(ValueError):
    """Bad caption set or manifest; the message says what to do."""


def _manifest(path: Path) -> dict:
    meta = layout.manifest_json(path)
    if not meta.is_file():
        raise CaptionError(f"{meta} not found: build the manifest with `aimv2 shard` first")
    try:
        return read_meta(meta)
    except ManifestMismatch as e:
        raise CaptionError(str(e)) from None


def _sample_parts(path: Path) -> list[Path]:
    parts = layout.sample_files(path)
    if not parts:
        raise CaptionError(f"{path}/samples has no parquet parts; build the manifest with `aimv2 shard` first")
    return parts


def _need(file, names, *cols):
    missing = [c for c in cols if c not in names]
    if missing:
        raise CaptionError(f"{file}: no column(s) {missing}; it has {list(names)} "
                           "(choose with --column, and --key-column when the key is named differently)")


def attach(manifest: str | Path, captions: str | Path, on: str, column: str, name: str | None = None,
           key_column: str | None = None, memory_limit: str = "1GB", max_caption_bytes: int = MAX_CAPTION_BYTES
           ) -> dict:
    """Join a caption set into every samples part as `syn_<name>`; returns matched/unmatched counts.

    Memory stays bounded whatever the set's size: the join runs in DuckDB under `memory_limit`, spilling
    to disk, and parts are rewritten one at a time. Work is per part: a part is rewritten atomically and
    marked done in MANIFEST/_captions/<name>/, so an interrupted attach resumes with the parts left.
    A manifest at a URL is worked on in a local copy of its parquet parts, each part uploaded when done,
    _manifest.json last."""
    if storage.is_url(manifest):
        from aimv2data.manifest.remote import staged_manifest

        with staged_manifest(str(manifest)) as (local, put):
            return _attach(local, captions, on, column, name, key_column, memory_limit, max_caption_bytes, put,
                           str(manifest))
    return _attach(Path(storage.local(str(manifest))), captions, on, column, name, key_column, memory_limit,
                   max_caption_bytes)


def _attach(manifest: Path, captions, on, column, name, key_column, memory_limit, max_caption_bytes, put=None,
            shown=None) -> dict:
    import tempfile

    _manifest(manifest)
    if on not in JOIN_KEYS:
        raise CaptionError(f"--on must be one of {', '.join(JOIN_KEYS)}, got {on!r}")
    name = name or column
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise CaptionError(f"caption set name {name!r}: use lower-case letters, digits and _ (it becomes "
                           f"the column {SYN_PREFIX}<name>); pass --name")
    col = SYN_PREFIX + name
    key_column = key_column or on
    set_file = _caption_file(captions)
    parts = _sample_parts(manifest)
    work = manifest / "_captions" / name
    _start_work(work, {"file": str(captions), "fingerprint": list(storage.stat(str(captions))), "on": on,
                       "key_column": key_column, "column": column}, put)
    with tempfile.TemporaryDirectory(prefix="aimv2-attach-") as tmp:
        found = _match(Path(tmp), set_file, parts, on, key_column, column, memory_limit, max_caption_bytes)
        total = _write_columns(parts, Path(tmp, "matches"), col, work, put)
    report = {"name": name, "column": col, "file": str(Path(captions).resolve()), "on": on,
              "key_column": key_column, "file_column": column, "rows_read": found["rows_read"],
              "keys": found["keys"], "matched_rows": found["matched"], "unmatched_rows": total - found["matched"],
              "captions": int(found["captions"] or 0), "unused_keys": found["keys"] - found["used"],
              "captions_too_large": found["too_large"],
              "attached": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    meta = _manifest(manifest)   # re-read: keep whatever changed meanwhile
    meta.setdefault("caption_sets", {})[name] = report
    meta.get("caption_sets_incomplete", {}).pop(name, None)
    write_json_atomic(meta, layout.manifest_json(manifest))
    if put:
        put(layout.manifest_json(manifest))
    _end_work(work, put)
    return report


def _start_work(work: Path, job: dict, put) -> None:
    """MANIFEST/_captions/<name>/: the job and one .done per rewritten part (what a resumed attach skips)."""
    if work.is_dir() and (work / "job.json").is_file() and read_json(work / "job.json") != job:
        for f in work.glob("*.done"):                 # an attach of another set under this name: start over
            f.unlink()
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(job, work / "job.json")
    if put:
        put(work / "job.json")


def _end_work(work: Path, put) -> None:
    for f in work.glob("*"):
        f.unlink()
        if put:
            put(f, remove=True)
    work.rmdir()
    try:
        work.parent.rmdir()
    except OSError:
        pass


def _match(tmp: Path, set_file: Path, parts: list[Path], on, key_column, column, memory_limit,
           max_caption_bytes) -> dict:
    """Join the set to every part's rows in DuckDB (bounded memory, spilling to `tmp`). The captions per
    matched row go to tmp/matches/pid=<part number>/; returns the counts the report gives."""
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET memory_limit='{memory_limit}'")
    con.execute(f"SET temp_directory='{tmp}/spill'")
    con.execute("SET preserve_insertion_order=false")
    src = _caption_relation(con, set_file, key_column, column)
    con.execute(f"CREATE TEMP VIEW c_all AS {src}")
    # a caption longer than shard's --max-caption-bytes is dropped here too, counted: 77 tokens are used
    con.execute(f"CREATE TEMP VIEW c AS SELECT * FROM c_all WHERE strlen(cap) <= {int(max_caption_bytes)}")
    too_large = con.execute(f"SELECT count(*) FROM c_all WHERE strlen(cap) > {int(max_caption_bytes)}").fetchone()[0]
    listing = ", ".join(f"('{str(p)}', {i})" for i, p in enumerate(parts))
    con.execute(f"CREATE TEMP VIEW parts(filename, pid) AS VALUES {listing}")
    con.execute(f"""COPY (
        SELECT m.pid, m.file_row_number AS row, list(c.cap ORDER BY c.ord) AS syn, any_value(m.k) AS k
        FROM (SELECT p.pid, r.file_row_number, CAST(r."{on}" AS VARCHAR) AS k
              FROM read_parquet([{", ".join(f"'{p}'" for p in parts)}], filename=true,
                                file_row_number=true, union_by_name=true) r JOIN parts p USING (filename)) m
        JOIN c ON m.k = c.k GROUP BY m.pid, m.file_row_number
    ) TO '{tmp}/matches' (FORMAT parquet, PARTITION_BY (pid))""")
    keys = con.execute("SELECT count(DISTINCT k) FROM c").fetchone()[0]
    rows_read = con.execute(f"SELECT count(*) FROM {_reader(set_file, key_column, column)}").fetchone()[0]
    used = matched = n_captions = 0
    if any(Path(tmp, "matches").glob("pid=*")):
        used, matched, n_captions = con.execute(
            f"SELECT count(DISTINCT k), count(*), sum(len(syn)) FROM read_parquet('{tmp}/matches/*/*.parquet')"
        ).fetchone()
    con.close()
    return {"too_large": too_large, "keys": keys, "rows_read": rows_read, "used": used, "matched": matched,
            "captions": n_captions}


def _write_columns(parts: list[Path], matches: Path, col: str, work: Path, put) -> int:
    """Rewrite each part not done yet with its `col` (replacing an earlier one); returns the rows of all parts."""
    total = 0
    for i, part in enumerate(parts):
        n = pq.ParquetFile(part).metadata.num_rows
        total += n
        done = work / f"{part.name}.done"
        if done.is_file():
            continue
        t = pq.read_table(part)
        if col in t.column_names:   # re-attaching a set replaces it
            t = t.drop_columns([col])
        found = sorted(Path(matches, f"pid={i}").glob("*.parquet"))
        t = t.append_column(pa.field(col, SYN_TYPE), _syn_column(n, found))
        write_parquet_atomic(t, part)
        done.write_text("")
        if put:
            put(part)
            put(done)
    return total


def _syn_column(n: int, found: list[Path]) -> pa.Array:
    """The part's n rows of captions: each matched row's list, null elsewhere."""
    if not found:
        return pa.nulls(n, SYN_TYPE)
    m = pq.read_table(found).select(["row", "syn"])
    where = np.full(n, -1, dtype=np.int64)
    where[m["row"].to_numpy()] = np.arange(m.num_rows)
    return m["syn"].combine_chunks().cast(SYN_TYPE).take(pa.array(where, mask=where < 0))


def _caption_file(captions) -> Path:
    file = Path(captions)
    if not file.is_file():
        raise CaptionError(f"caption set {file} not found")
    suffix = "".join(file.suffixes[-2:]).lower()
    if not suffix.endswith((".parquet", ".jsonl", ".ndjson", ".json")):
        raise CaptionError(f"{file}: caption sets are .parquet or .jsonl files")
    return file


def _reader(file: Path, key_column: str, column: str) -> str:
    if str(file).lower().endswith(".parquet"):
        return f"read_parquet('{file}', file_row_number=true)"
    return f"(SELECT *, row_number() OVER () AS file_row_number FROM read_json_auto('{file}', format='newline_delimited'))"


def _caption_relation(con, file: Path, key_column: str, column: str) -> str:
    """SQL of (k, cap, ord): one row per distinct (key, caption), first occurrence order; null/blank dropped;
    a list column counts as several captions."""
    src = _reader(file, key_column, column)
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    _need(file, [c for c in types if c != "file_row_number"], key_column, column)
    kind = types[column]
    if kind.endswith("[]"):
        flat = (f"SELECT CAST(\"{key_column}\" AS VARCHAR) AS k, unnest(\"{column}\") AS cap, "
                f"file_row_number * 1000000 + unnest(range(len(\"{column}\"))) AS ord FROM {src}")
    else:
        flat = f"SELECT CAST(\"{key_column}\" AS VARCHAR) AS k, \"{column}\" AS cap, file_row_number * 1000000 AS ord FROM {src}"
    return (f"SELECT k, cap, min(ord) AS ord FROM (SELECT k, trim(CAST(cap AS VARCHAR)) AS cap, ord FROM ({flat})) "
            f"WHERE k IS NOT NULL AND cap IS NOT NULL AND cap <> '' GROUP BY k, cap")


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


def caption_part(root: str, part: str, model: str, *, name: str = "caption", batch_size: int = 16,
                 max_new_tokens: int = 30, num_beams: int = 1, device: str = "auto", limit: int | None = None,
                 loaded=None) -> tuple[bytes, int, list[str], str]:
    """Caption one samples part (local path or URL; its shards resolved against the manifest `root`).
    Returns (caption-set rows as parquet bytes, failed, failure notes, device). Runs anywhere: in this
    process, or as one Ray task per part."""
    import io

    import polars as pl
    import torch

    net, images, decode, device = loaded or _load_captioner(model, device)
    cols = ["key", "uid", "url", "sha256", "shard", "offset", "size"]
    df = storage.read_parquet(part, columns=cols)
    if limit is not None:
        df = df.head(limit)
    texts: list[str | None] = []
    failures, failed = [], 0
    for start in range(0, df.height, batch_size):
        chunk = df.slice(start, batch_size)
        ims, ok = [], []
        for r in chunk.iter_rows(named=True):
            shard = storage.resolve_against(root, r["shard"])
            try:
                ims.append(_image(storage.read_range(shard, r["offset"], r["size"])))
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
    res = df.select("key", "uid", "url", "sha256").with_columns(
        pl.Series(name, texts, dtype=pl.String), pl.lit(Path(model).name).alias("model"))
    buf = io.BytesIO()
    res.filter(pl.col(name).is_not_null()).write_parquet(buf)
    return buf.getvalue(), failed, failures, device


def _image(data: bytes):
    import io

    from PIL import Image, ImageOps

    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def generate(manifest: str | Path, model: str, *, output: str | Path | None = None, name: str = "caption",
             batch_size: int = 16, max_new_tokens: int = 30, num_beams: int = 1, device: str = "auto",
             limit: int | None = None, progress: bool = True, distributor: str = "local",
             ray_address: str | None = None) -> dict:
    """Caption every sample of the manifest; write a caption set (key, uid, url, sha256, <name>, model).
    Work is saved per samples part in OUTPUT.parts/, so an interrupted run resumes; memory holds one part.
    `distributor="ray"`: one Ray task per part (a GPU each where the cluster has them). The manifest and
    OUTPUT may be URLs."""
    from tqdm import tqdm

    root = str(manifest).rstrip("/")
    meta = layout.manifest_json(root)
    if not meta.is_file():
        raise CaptionError(f"{meta} not found: build the manifest with `aimv2 shard` first")
    parts = sorted(str(p) for p in layout.sample_files(root))
    if not parts:
        raise CaptionError(f"{root}/samples has no parquet parts; build the manifest with `aimv2 shard` first")
    output = str(output) if output else layout.caption_set_path(root, Path(model).name)
    if not output.endswith((".parquet", ".jsonl")):
        raise CaptionError(f"--output {output}: write a .parquet or .jsonl caption set")
    if not Path(model).is_dir():
        raise CaptionError(f"--model {model}: not a folder; pass a local model saved with save_pretrained "
                           "(config, weights, image processor and tokenizer)")
    work = storage.upath(output + ".parts")
    kw = dict(name=name, batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams, device=device)

    todo = _parts_to_caption(parts, work, limit)
    bar = tqdm(total=len(todo), unit="part", desc="caption", disable=not progress, dynamic_ncols=True)
    failed, failures, used = 0, [], device
    for p, data, f, notes, dev in _run_parts(root, todo, model, kw, distributor, ray_address):
        storage.write_bytes(str(work / Path(p).name), data)
        failed, used = failed + f, dev
        failures += notes
        bar.update(1)
    bar.close()
    captioned = _write_caption_set(work, output, name)
    if used == "auto":
        import torch

        used = "cuda" if torch.cuda.is_available() else "cpu"
    return {"output": output, "captioned": captioned, "failed": failed, "failures": failures[:20],
            "model": str(model), "device": used, "column": name}


def _parts_to_caption(parts: list[str], work, limit: int | None) -> list[tuple[str, int | None]]:
    """(part, rows to caption or None for all) for the parts not done in `work`, the first `limit` rows in all."""
    counts = [pq.ParquetFile(storage.open_file(p)).metadata.num_rows if storage.is_url(p)
              else pq.ParquetFile(p).metadata.num_rows for p in parts]
    todo, left = [], limit
    for p, n in zip(parts, counts):
        if left is not None and left <= 0:
            break
        take = n if left is None else min(n, left)
        left = None if left is None else left - take
        if not (work / Path(p).name).is_file():
            todo.append((p, take if limit else None))
    return todo


def _write_caption_set(work, output: str, name: str) -> int:
    """The per-part results in `work` concatenated into the caption set `output` (work removed); its rows."""
    import io

    import polars as pl

    done = sorted(str(f) for f in work.glob("*.parquet"))
    merged = pl.concat([storage.read_parquet(f) for f in done]) if done else pl.DataFrame(
        schema={"key": pl.String, "uid": pl.String, "url": pl.String, "sha256": pl.String, name: pl.String,
                "model": pl.String})
    buf = io.BytesIO()
    merged.write_ndjson(buf) if output.endswith(".jsonl") else merged.write_parquet(buf)
    storage.write_bytes(output, buf.getvalue())
    for f in done:
        storage.upath(f).unlink()
    if not storage.is_url(work):
        work.rmdir()
    return merged.height


def _run_parts(root, todo, model, kw, distributor, ray_address):
    """Yield (part, parquet bytes, failed, failure notes, device) per part, as they finish."""
    if distributor == "ray":
        import ray

        from aimv2data.cluster import connect_ray

        connect_ray(ray_address)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(caption_part)
        refs = {task.remote(root, p, model, limit=lim, **kw): p for p, lim in todo}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield (refs[ready[0]], *ray.get(ready[0]))
        return
    if distributor != "local":
        raise CaptionError(f"--distributor {distributor!r}: use local or ray")
    loaded = _load_captioner(model, kw["device"]) if todo else None
    for p, lim in todo:
        yield (p, *caption_part(root, p, model, limit=lim, loaded=loaded, **kw))
