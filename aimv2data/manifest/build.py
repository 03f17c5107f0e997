"""`aimv2 shard`: webdataset tars -> MANIFEST/{samples,rejects}/part-*.parquet -> _manifest.json.

Work is per tar. Each tar becomes one samples part and one rejects part (plus a DALI .idx), written
atomically, then a small `_parts/<part>.json` that marks the tar done; a rerun skips done tars, so a
killed run resumes where it stopped. `part=(i, n)` processes tars i, i+n, i+2n, ... of the sorted input
list, so any scheduler can run the slices in parallel; the merge (automatic once every tar is done, or
`merge_manifest`) sums the per-tar summaries into `_manifest.json` and `shards.parquet`.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from aimv2data import storage
from aimv2data.buckets import AREAS, make_table
from aimv2data.paper import PATCH_SIZE
from aimv2data.urls import strip_userinfo
from aimv2data.manifest.inspect_image import DEFAULT_MAX_PIXELS, VERIFY_LEVELS, Rejected, inspect_image
from aimv2data.manifest import layout
from aimv2data.manifest.schema import (MAX_CAPTION_BYTES, MAX_IMAGE_BYTES, MAX_JSON_BYTES, REJECT_SCHEMA,
                                       SAMPLE_SCHEMA, SCHEMA_VERSION, SYN_PREFIX, SYN_TYPE, read_json,
                                       write_json_atomic, write_parquet_atomic)
from aimv2data.manifest.integrity import ManifestMismatch, read_meta
from aimv2data.manifest.lock import LOCK_NAME, LockHeld, output_lock
from aimv2data.manifest.tarindex import (IMAGE_EXTS, TarUnreadable, index_tar, open_tar, split_name,
                                         write_dali_index)

IDX_MODES = ("beside", "manifest", "none")
DISTRIBUTORS = ("multiprocessing", "ray")


class ManifestBuildError(RuntimeError):
    """Bad inputs or an inconsistent manifest directory; the message says what to do."""


@dataclass(frozen=True)
class ShardOptions:
    patch_size: int = PATCH_SIZE
    verify: str = "header"                 # header | draft | decode (aimv2data.manifest.inspect_image)
    max_pixels: int = DEFAULT_MAX_PIXELS   # larger images are rejected as decompression bombs
    min_side: int = 1                      # shorter display side -> too_small
    max_aspect: float = 8.0                # max(w/h, h/w) above this -> extreme_aspect
    num_buckets: int = 33
    bucket_max_aspect: float = 4.0
    absolute_paths: bool = False           # `shard` column absolute instead of relative to the manifest
    source: str | None = None              # source name when the json has none (default: input's name)
    idx: str = "beside"                    # where DALI .idx files go: beside the tar | manifest | none
    # members larger than these (by their tar header) are never read: the sample is rejected as *_too_large
    max_caption_bytes: int = MAX_CAPTION_BYTES
    max_json_bytes: int = MAX_JSON_BYTES
    max_image_bytes: int = MAX_IMAGE_BYTES

    def validate(self) -> None:
        if self.verify not in VERIFY_LEVELS:
            raise ManifestBuildError(f"--verify must be one of {', '.join(VERIFY_LEVELS)}, got {self.verify!r}")
        if self.idx not in IDX_MODES:
            raise ManifestBuildError(f"--idx must be one of {', '.join(IDX_MODES)}, got {self.idx!r}")
        if self.patch_size < 1 or self.min_side < 1 or self.max_pixels < 1:
            raise ManifestBuildError("--patch-size, --min-side and --max-pixels must be positive")
        if min(self.max_caption_bytes, self.max_json_bytes, self.max_image_bytes) < 1:
            raise ManifestBuildError("--max-caption-bytes, --max-json-bytes and --max-image-bytes must be positive")
        if self.max_aspect < 1:
            raise ManifestBuildError(f"--max-aspect is max(w/h, h/w), so >= 1; got {self.max_aspect}")
        make_table(self.num_buckets, self.bucket_max_aspect)   # raises ValueError on a bad table

    def fingerprint(self) -> str:
        """Hash of everything that changes the rows of a part: a done tar built with other options is
        rebuilt, not mixed in."""
        d = dataclasses.asdict(self)
        for k in ("patch_size", "idx"):
            d.pop(k)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TarJob:
    path: str          # absolute
    source: str        # default source name (the input folder's name)
    part: str          # part id: <stem>-<hash of the path>, unique across inputs


# --- inputs ----------------------------------------------------------------------------------------

def resolve_inputs(inputs: list[str]) -> list[TarJob]:
    """Folders (their *.tar), tar files, or glob patterns, in the order given (sorted within each)."""
    if not inputs:
        raise ManifestBuildError("no INPUT given: pass fetched shard folders, .tar files or glob patterns")
    jobs, seen = [], set()
    for inp in inputs:
        if storage.is_url(inp):
            tars, source = _remote_tars(inp)
            for t in tars:
                if t not in seen:
                    seen.add(t)
                    stem = t.rsplit("/", 1)[-1].split(".")[0] or "tar"
                    jobs.append(TarJob(t, source, f"{stem}-{hashlib.sha1(t.encode()).hexdigest()[:8]}"))
            continue
        inp = storage.local(inp)
        p = Path(inp)
        if p.is_dir():
            tars = sorted(str(t) for t in p.glob("*.tar"))
            if not tars:
                raise ManifestBuildError(f"{inp}: a folder without *.tar files; pass a folder of webdataset "
                                         "shards (what `aimv2 fetch` writes) or the .tar files themselves")
            source = p.resolve().name
        elif p.is_file():
            tars, source = [str(p)], p.resolve().parent.name
        else:
            tars = sorted(t for t in glob.glob(inp, recursive=True) if os.path.isfile(t))
            if not tars:
                raise ManifestBuildError(f"{inp}: no such file or folder, and no file matches it as a pattern")
            source = Path(tars[0]).resolve().parent.name
        for t in tars:
            real = os.path.realpath(t)
            if real in seen:
                continue
            seen.add(real)
            stem = Path(real).name.split(".")[0] or "tar"
            jobs.append(TarJob(real, source, f"{stem}-{hashlib.sha1(real.encode()).hexdigest()[:8]}"))
    return jobs


def _remote_tars(inp: str) -> tuple[list[str], str]:
    """The tars a URL names (a prefix holding *.tar, one .tar, or a glob), as URLs, and the source name."""
    fs, p = storage.filesystem(inp)
    try:
        if fs.isdir(p):
            tars = sorted(fs.glob(p.rstrip("/") + "/*.tar"))
            if not tars:
                raise ManifestBuildError(f"{inp}: a prefix without *.tar objects; pass a prefix of webdataset "
                                         "shards (what `aimv2 fetch` writes) or the .tar URLs themselves")
        elif fs.isfile(p):
            tars = [p]
        else:
            tars = sorted(t for t in fs.glob(p) if t.endswith(".tar"))
            if not tars:
                storage.check_reachable(inp)
                raise ManifestBuildError(f"{inp}: no such object or prefix, and nothing matches it as a pattern")
    except ManifestBuildError:
        raise
    except Exception as e:
        raise ManifestBuildError(str(storage.friendly(e, inp))) from None
    urls = [fs.unstrip_protocol(t) for t in tars]
    return urls, urls[0].rstrip("/").rsplit("/", 2)[-2]


def parse_part(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    if spec is None or isinstance(spec, tuple):
        return spec
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ManifestBuildError(f"--part {spec!r}: expected i/N with integers, e.g. 0/8") from None
    if n < 1 or not 0 <= i < n:
        raise ManifestBuildError(f"--part {spec}: need 0 <= i < N (parts are numbered from 0)")
    return i, n


# --- one tar ---------------------------------------------------------------------------------------

_paths = layout.part_paths


def _decode_caption(raw: bytes, counts: Counter) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        counts["caption_non_utf8"] += 1
    text = text.strip()
    if not text:
        counts["caption_empty"] += 1
        return None
    return text


def _as_int(v) -> int | None:
    try:
        return int(v) if v is not None and not isinstance(v, bool) else None
    except (TypeError, ValueError):
        return None


def _too_large(s, opts: ShardOptions) -> tuple[str, str, object] | None:
    """(reason, detail, member) for the first member of `s` whose header claims more bytes than its kind's
    limit, judged before anything is read: a sparse 12 KB tar can claim a 1 GiB caption."""
    _, img = s.image()
    for reason, m, limit, flag in (("json_too_large", s.members.get("json"), opts.max_json_bytes, "json"),
                                   ("image_too_large", img, opts.max_image_bytes, "image"),
                                   ("caption_too_large", s.members.get("txt"), opts.max_caption_bytes, "caption")):
        if m is not None and m.size > limit:
            return reason, f"{m.name} is {m.size} bytes, above --max-{flag}-bytes {limit}", m
    return None


def _read_meta(s, read, counts: Counter) -> dict:
    if "json" not in s.members:
        return {}
    try:
        meta = json.loads(read(s.members["json"]))
    except Exception:   # not JSON, not UTF-8, absurdly nested: the sample is still usable without it
        counts["json_errors"] += 1
        return {}
    return meta if isinstance(meta, dict) else {}


def _inspect(data: bytes, opts: ShardOptions):
    try:
        p = inspect_image(data, opts.verify, opts.max_pixels)
    except Rejected:
        raise
    except Exception as e:  # a decoder bug on hostile bytes must cost one sample, not the run
        raise Rejected("corrupt", f"unexpected {type(e).__name__}: {e}") from None
    if min(p.width, p.height) < opts.min_side:
        raise Rejected("too_small", f"{p.width}x{p.height} < --min-side {opts.min_side}")
    if max(p.width / p.height, p.height / p.width) > opts.max_aspect:
        raise Rejected("extreme_aspect", f"{p.width}x{p.height} beyond --max-aspect {opts.max_aspect}")
    return p


def _str(v) -> str | None:
    return v if isinstance(v, str) and v else None


def _hashes(meta: dict, data: bytes) -> dict:
    """sha256 (of the downloaded bytes when the json has it), stored_sha256 (of the member) and reencoded
    (they differ; null when the json does not say what was downloaded): SPEC 1.1."""
    stored = _str(meta.get("stored_sha256")) or hashlib.sha256(data).hexdigest()
    downloaded = _str(meta.get("sha256"))
    reencoded = meta.get("reencoded")
    if not isinstance(reencoded, bool):
        reencoded = downloaded != stored if downloaded else None
    return {"sha256": downloaded or stored, "stored_sha256": stored, "reencoded": reencoded}


class _TarScan:
    """What one tar yields as it is read: sample rows, reject rows, the kept samples (for the .idx), counters."""

    def __init__(self, shard: str, default_source: str, opts: ShardOptions, table):
        self.shard, self.default_source, self.opts, self.table = shard, default_source, opts, table
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.kept: list = []
        self.counts: Counter = Counter()

    def reject(self, reason, detail, key=None, member=None, meta=None, source=None):
        meta = meta or {}
        self.rejects.append({
            "key": key, "source": self.default_source if source is None else source,
            "url": strip_userinfo(_str(meta.get("url"))), "uid": _uid(meta), "shard": self.shard,
            "member": member.name if member else None,
            "offset": member.offset if member else None, "size": member.size if member else None,
            "reason": reason, "detail": detail})


def process_tar(job: TarJob, output: str, opts: ShardOptions) -> dict:
    """Index, inspect and bucket one tar; write its parts; return its summary (also saved as _parts/*.json)."""
    t0 = time.perf_counter()
    output = Path(output)
    table = make_table(opts.num_buckets, opts.bucket_max_aspect)
    # a tar at a URL is always referred to by its URL (manifests/SPEC.md)
    shard = job.path if opts.absolute_paths or storage.is_url(job.path) else os.path.relpath(job.path, output)
    tar_size, tar_version = storage.stat(job.path)
    scan = _TarScan(shard, opts.source or job.source, opts, table)
    try:
        index = index_tar(job.path)
    except TarUnreadable as e:
        index = None
        scan.reject("tar_unreadable", str(e))
    if index is not None:
        _scan_tar(job, index, scan)
    _reject_lost(job, index, scan)
    paths = _paths(output, job.part)
    write_parquet_atomic(pa.Table.from_pylist(scan.rows, schema=SAMPLE_SCHEMA), paths["samples"])
    write_parquet_atomic(pa.Table.from_pylist(scan.rejects, schema=REJECT_SCHEMA), paths["rejects"])
    idx_path = _write_idx(job, output, opts, scan.kept)
    summary = {"tar": job.path, "shard": shard, "part": job.part, "tar_size": tar_size, "tar_mtime_ns": tar_version,
               "fingerprint": opts.fingerprint(), "options": dataclasses.asdict(opts), **_tally(scan, idx_path),
               "seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(summary, paths["done"])   # last: its presence means the tar is done
    return summary


def _scan_tar(job: TarJob, index, scan: _TarScan) -> None:
    """The tar's own damage first (truncated members, a bad tail, skipped ranges), then each sample."""
    truncated_keys = set()
    for m in index.truncated:
        key, ext = split_name(m.name)
        if ext.lower() in IMAGE_EXTS:
            truncated_keys.add(key)
            scan.reject("tar_truncated", f"member data ends at byte {m.offset + m.size}, the tar has "
                        f"{index.file_size} bytes", key=key, member=m)
        else:
            scan.counts["members_truncated"] += 1
    if index.tail_problem:
        scan.reject("tar_tail", index.tail_problem)
    for what in index.damaged:
        scan.reject("tar_damaged", what)
    scan.counts["members_ignored"] += index.ignored
    with open_tar(job.path) as f:
        def read(m):
            f.seek(m.offset)
            return f.read(m.size)

        for s in index.samples:
            _scan_sample(s, read, truncated_keys, scan)


def _scan_sample(s, read, truncated_keys: set[str], scan: _TarScan) -> None:
    """One sample: a row when its image is usable, else a reject row saying why."""
    opts = scan.opts
    big = _too_large(s, opts)
    if big is not None:
        scan.reject(*big[:2], s.key, big[2])
        return
    meta = _read_meta(s, read, scan.counts)
    source = str(meta.get("source") or scan.default_source)
    for m in s.extra:
        if split_name(m.name)[1].lower() in IMAGE_EXTS:
            scan.reject("duplicate_member", f"{s.key} already has an image member", s.key, m, meta, source)
        else:
            scan.counts["members_ignored"] += 1
    _, img = s.image()
    if img is None:
        if s.key not in truncated_keys:   # else its image was cut off: already a tar_truncated
            first = next(iter(s.members.values()))
            scan.reject("missing_image", f"members {sorted(s.members)} but no {'/'.join(IMAGE_EXTS)}",
                        s.key, first, meta, source)
        return
    data = read(img)
    try:
        p = _inspect(data, opts)
        scan.counts["exif_errors"] += p.exif_error
        caption = _caption(s, meta, read, opts, scan.counts)
    except Rejected as e:
        scan.reject(e.reason, e.detail, s.key, img, meta, source)
        return
    scan.rows.append({
        "key": s.key, "source": source, "uid": _uid(meta), "url": strip_userinfo(_str(meta.get("url"))),
        **_hashes(meta, data),
        "shard": scan.shard, "member": img.name, "offset": img.offset, "size": img.size,
        "format": p.format, "width": p.width, "height": p.height, "orientation": p.orientation,
        "mode": p.mode, "alpha": p.alpha, "bit_depth": p.bit_depth,
        "original_width": _as_int(meta.get("original_width")),
        "original_height": _as_int(meta.get("original_height")),
        "bucket": scan.table.bucket_of(p.width, p.height), "caption": caption,
    })
    scan.kept.append(s)


def _caption(s, meta: dict, read, opts: ShardOptions, counts: Counter) -> str | None:
    """The sample's .txt, else the json's `caption`; one above --max-caption-bytes rejects the sample."""
    if "txt" in s.members:
        return _decode_caption(read(s.members["txt"]), counts)
    if not _str(meta.get("caption")):
        return None
    raw = meta["caption"].encode("utf-8", "replace")
    if len(raw) > opts.max_caption_bytes:
        raise Rejected("caption_too_large", f"{s.members['json'].name} caption is {len(raw)} bytes, "
                       f"above --max-caption-bytes {opts.max_caption_bytes}")
    return _decode_caption(raw, counts)


def _reject_lost(job: TarJob, index, scan: _TarScan) -> None:
    seen = set() if index is None else {s.key for s in index.samples} | {split_name(m.name)[0] for m in index.truncated}
    for key in _lost_keys(job.path, seen):
        scan.reject("missing_from_tar", f"listed as downloaded in {Path(job.path).with_suffix('.parquet').name}, "
                    "absent from the tar (lost with a damaged or truncated part of it)", key=key)


def _tally(scan: _TarScan, idx_path: str | None) -> dict:
    """The counts a tar's summary carries (the merge sums them into _manifest.json)."""
    rows, rejects = scan.rows, scan.rejects
    return {
        "samples": len(rows), "rejects": len(rejects), "idx": idx_path,
        "per_reason": dict(Counter(r["reason"] for r in rejects)),
        "per_bucket": {str(k): v for k, v in sorted(Counter(r["bucket"] for r in rows).items())},
        "per_source": dict(Counter(r["source"] for r in rows)),
        "per_format": dict(Counter(r["format"] for r in rows)),
        "captions": sum(r["caption"] is not None for r in rows),
        "counters": dict(scan.counts),
        "bytes_read": sum(r["size"] for r in rows),
    }


TAR_LEVEL = ("tar_unreadable", "tar_tail", "tar_damaged")   # reject rows about the tar, not one sample


def _lost_keys(tar: str, seen: set[str]) -> list[str]:
    """Keys img2dataset's `NNNNN.parquet` (beside `NNNNN.tar`) lists as downloaded that the tar does not
    hold: what a damaged or truncated tar lost. [] when there is no such parquet."""
    listing = Path(tar).with_suffix(".parquet")
    if not listing.is_file():
        return []
    try:
        cols = pq.read_schema(listing).names
        if "key" not in cols:
            return []
        t = pq.read_table(listing, columns=[c for c in ("key", "status") if c in cols]).to_pydict()
    except Exception:   # an unreadable listing costs the count, not the tar
        return []
    status = t.get("status") or ["success"] * len(t["key"])
    return [k for k, st in zip(t["key"], status) if k is not None and st == "success" and k not in seen]


def _uid(meta: dict) -> str | None:
    for k in ("uid", "id"):
        v = meta.get(k)
        if v is not None and v != "":
            return str(v)
    return None


def _write_idx(job: TarJob, output: Path, opts: ShardOptions, kept) -> str | None:
    """DALI .idx of the KEPT samples only, so DALI's webdataset reader never meets a rejected image.
    Beside the tar (DALI's naming: 00001.tar -> 00001.idx) unless that folder is read-only or already
    holds an .idx this manifest did not write; then MANIFEST/idx/<part>.idx."""
    if opts.idx == "none" or not kept:
        return None
    if opts.idx == "beside" and not storage.is_url(job.path):   # beside a tar at a URL: in MANIFEST/idx
        tar = Path(job.path)
        beside = tar.with_name(tar.name.split(".")[0] + ".idx")
        done = _paths(output, job.part)["done"]
        ours = done.is_file() and read_json(done).get("idx") == str(beside)
        if (ours or not beside.exists()) and os.access(tar.parent, os.W_OK):
            try:
                write_dali_index(str(beside), kept)
                return str(beside)
            except OSError:
                pass
    target = layout.idx_path(output, job.part)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_dali_index(str(target), kept)
    return str(target.resolve())


def _process_star(args):
    job, output, opts = args
    try:
        return job, process_tar(job, output, opts), None
    except Exception as e:   # I/O errors etc.: report this tar, keep the others going
        return job, None, f"{type(e).__name__}: {e}"


def _done_summary(job: TarJob, output: Path, opts: ShardOptions, verify: bool = True) -> dict | None:
    """The part's summary if it is done for this tar as it is now (same options, same tar size and version);
    `verify` also reads the part back in full (CRCs, row count)."""
    p = _paths(output, job.part)
    if not (p["done"].is_file() and p["samples"].is_file() and p["rejects"].is_file()):
        return None
    try:
        s = read_json(p["done"])
        size, version = storage.stat(job.path)
    except (OSError, ValueError):
        return None
    same = (s.get("fingerprint") == opts.fingerprint() and s.get("tar_size") == size
            and s.get("tar_mtime_ns") == version)
    if same and verify and not (_part_intact(p["samples"], s.get("samples")) and _part_intact(p["rejects"], s.get("rejects"))):
        print(f"aimv2 shard: {p['samples'].parent.name}/{p['samples'].name} or its rejects part is damaged; "
              f"redoing {job.path}", file=sys.stderr, flush=True)
        return None
    return s if same else None


def _part_intact(path: Path, rows: int | None) -> bool:
    """The part reads back completely (footer, every page; pages carry CRCs) with the rows its summary
    recorded. A part file that merely exists is not proof of a done tar."""
    try:
        t = pq.read_table(path, page_checksum_verification=True)
    except Exception:
        return False
    return rows is None or t.num_rows == rows


# --- the whole build -------------------------------------------------------------------------------

def build_manifest(inputs: list[str], output: str | Path, *, workers: int = 1, part=None, merge: bool = True,
                   progress: bool = True, argv: list[str] | None = None, distributor: str = "multiprocessing",
                   ray_address: str | None = None, on_tar_done=None, **options) -> dict:
    """Build (or resume) the manifest of `inputs` in `output`. Returns a report dict: tars processed /
    skipped / failed, samples, rejects by reason, seconds, and whether _manifest.json was written.
    `output` may be a URL (aimv2data.manifest.remote); `distributor="ray"` runs one Ray task per tar."""
    if storage.is_url(output):
        from aimv2data.manifest.remote import build_at_url

        return build_at_url(inputs, str(output), build_manifest, ManifestBuildError, workers=workers, part=part,
                            merge=merge, progress=progress,
                            argv=argv, distributor=distributor, ray_address=ray_address, **options)
    if distributor not in DISTRIBUTORS:
        raise ManifestBuildError(f"--distributor {distributor!r}: use one of {', '.join(DISTRIBUTORS)}")
    opts = ShardOptions(**options)
    opts.validate()
    part = parse_part(part)
    output = Path(storage.local(str(output)))
    _check_output_is_ours(output)              # the cheap refusals before Ray's start-up (tens of seconds)
    jobs = resolve_inputs(list(inputs))
    if distributor == "ray":
        from aimv2data.cluster import connect_ray

        connect_ray(ray_address)               # an address that does not answer: refused before anything is written
    mine = jobs[part[0]::part[1]] if part else jobs
    try:
        with output_lock(output, part, argv):
            # before writing anything: a refusal must leave the manifest as it was
            _check_no_strangers(output, {j.part for j in jobs})
            return _build(jobs, mine, output, opts, workers=workers, merge=merge, progress=progress,
                          inputs=inputs, argv=argv, distributor=distributor, ray_address=ray_address,
                          on_tar_done=on_tar_done)
    except LockHeld as e:
        raise ManifestBuildError(str(e)) from None


def _build(jobs, mine, output, opts, *, workers, merge, progress, inputs, argv, distributor, ray_address,
           on_tar_done) -> dict:
    t0 = time.perf_counter()
    summaries, todo = [], []
    for j in mine:
        s = _done_summary(j, output, opts)
        (summaries.append(s) if s else todo.append(j))
    skipped = len(summaries)
    done_now, failed = _run_tars(todo, output, opts, workers=workers, progress=progress, distributor=distributor,
                                 ray_address=ray_address, on_tar_done=on_tar_done)
    summaries += done_now
    report = {
        "tars": len(jobs), "tars_in_part": len(mine), "processed": len(done_now), "skipped": skipped,
        "failed": failed, "samples": sum(s["samples"] for s in summaries),
        "rejects": sum(s["rejects"] for s in summaries),
        "per_reason": dict(sum((Counter(s["per_reason"]) for s in summaries), Counter())),
        "samples_processed": sum(s["samples"] + s["rejects"] for s in done_now),
        "tar_problems": sum(s["per_reason"].get(r, 0) for s in summaries for r in TAR_LEVEL),
        "seconds": round(time.perf_counter() - t0, 3), "merged": False, "missing": None, "output": str(output),
        "idx": Counter("none" if not s["idx"] else ("manifest" if s["idx"].startswith(str(output.resolve()))
                                                   else "beside") for s in summaries),
    }
    if merge and not failed:
        # every tar is stat'ed again (one changed during the build blocks the merge); the parts this run
        # found intact or wrote itself are not read back a second time
        done = {s["part"] for s in summaries}
        missing = [j for j in jobs if _done_summary(j, output, opts, verify=j.part not in done) is None]
        report["missing"] = len(missing)
        if not missing:
            merge_manifest(output, list(inputs), opts=opts, argv=argv, _locked=True)
            report["merged"] = True
    return report


def _run_tars(todo, output, opts, *, workers, progress, distributor, ray_address, on_tar_done):
    """Process the tars not done yet (Ray tasks, a process pool, or in turn); returns (summaries, failures)."""
    failed: list[tuple[str, str]] = []
    done_now: list[dict] = []
    from tqdm import tqdm
    bar = tqdm(total=len(todo), unit="tar", desc="shard", disable=not progress or not todo, dynamic_ncols=True)
    tasks = [(j, str(output), opts) for j in todo]
    if distributor == "ray" and todo:
        from aimv2data.manifest.remote import ray_results

        _collect(ray_results(tasks, ray_address, process_tar), bar, done_now, failed, on_tar_done)
    elif workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        # spawn, not fork: the parent may hold polars/arrow thread pools, which do not survive a fork
        with mp.get_context("spawn").Pool(min(workers, len(todo))) as pool:
            results = pool.imap_unordered(_process_star, tasks)
            _collect(results, bar, done_now, failed, on_tar_done)
    else:
        _collect(map(_process_star, tasks), bar, done_now, failed, on_tar_done)
    bar.close()
    return done_now, failed


def _collect(results, bar, done_now, failed, on_tar_done=None):
    for job, summary, err in results:
        if err:
            failed.append((job.path, err))
        else:
            done_now.append(summary)
            if on_tar_done is not None:
                on_tar_done(summary)
        bar.update(1)
        bar.set_postfix(kept=sum(s["samples"] for s in done_now), rejected=sum(s["rejects"] for s in done_now))


# --- merge -----------------------------------------------------------------------------------------

def merge_manifest(output: str | Path, inputs: list[str] | None = None, *, opts: ShardOptions | None = None,
                   argv: list[str] | None = None, _locked: bool = False) -> dict:
    """Write _manifest.json and shards.parquet from the per-tar summaries. With `inputs`, every tar they
    resolve to must be done; without, the tars recorded under _parts/ are the manifest."""
    if not _locked:
        try:
            with output_lock(output, None, argv):
                return merge_manifest(output, inputs, opts=opts, argv=argv, _locked=True)
        except LockHeld as e:
            raise ManifestBuildError(str(e)) from None
    output = Path(output)
    summaries = _summaries_of(output, inputs)
    fps = {s["fingerprint"] for s in summaries}
    if len(fps) > 1:
        raise ManifestBuildError(f"{output}: parts were built with different options ({len(fps)} variants); "
                                 "rerun `aimv2 shard` with one set of options, it rebuilds the odd parts")
    opts = opts or ShardOptions(**summaries[0]["options"])
    _check_no_strangers(output, {s["part"] for s in summaries})

    old = _replaced_summary(output)
    caption_sets = old.get("caption_sets", {})
    uncovered = _align_caption_columns(output, summaries, caption_sets)
    table = make_table(opts.num_buckets, opts.bucket_max_aspect)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _write_shards_table(output, summaries)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "generator": {"name": "aimv2 shard", "version": _version()},
        "created": old.get("created", now),
        "updated": now,
        "patch_size": opts.patch_size,
        "areas": list(AREAS),
        "bucket_spec": table.spec(),
        "buckets": table.to_json(AREAS),
        "files": {"samples": layout.SAMPLES_GLOB, "rejects": layout.REJECTS_GLOB, "shards": layout.SHARDS},
        "paths": "absolute" if opts.absolute_paths else "relative",
        "parts": sorted(layout.part_file(s["part"]) for s in summaries),   # readers check samples/ against it
        "counts": _counts(summaries, len(table)),
        "inputs": ([i if storage.is_url(i) else os.path.abspath(storage.local(i)) for i in inputs] if inputs
                   else old.get("inputs", [])),
        "args": {**dataclasses.asdict(opts), "argv": argv if argv is not None else old.get("args", {}).get("argv")},
        "caption_sets": caption_sets,
    }
    if uncovered:
        manifest["caption_sets_incomplete"] = uncovered
    write_json_atomic(manifest, layout.manifest_json(output))
    _remove_stale_temps(output)
    return manifest


def _summaries_of(output: Path, inputs: list[str] | None) -> list[dict]:
    """The done tars' summaries: every tar `inputs` resolve to (all must be done), else all under _parts/."""
    if not inputs:
        summaries = [read_json(p) for p in sorted((output / layout.PARTS).glob("*.json"))]
        if not summaries:
            raise ManifestBuildError(f"{output}: nothing to merge (no _parts/*.json); run `aimv2 shard` first")
        return summaries
    jobs = resolve_inputs(list(inputs))
    summaries, missing = [], []
    for j in jobs:
        p = _paths(output, j.part)
        if p["done"].is_file() and p["samples"].is_file() and p["rejects"].is_file():
            summaries.append(read_json(p["done"]))
        else:
            missing.append(j.path)
    if missing:
        raise ManifestBuildError(
            f"{len(missing)} of {len(jobs)} tars are not sharded yet (e.g. {missing[0]}); run "
            "`aimv2 shard` for the missing parts first (it skips finished tars)")
    return summaries


def _counts(summaries: list[dict], n_buckets: int) -> dict:
    """_manifest.json `counts`: the per-tar summaries summed (every bucket listed, empty ones as 0)."""
    per_bucket = Counter({str(b): 0 for b in range(n_buckets)})
    tot = {k: Counter() for k in ("per_source", "per_format", "per_reason", "counters")}
    for s in summaries:
        per_bucket.update(s["per_bucket"])
        for k in tot:
            tot[k].update(s[k])
    return {
        "shards": len(summaries),
        "samples": sum(s["samples"] for s in summaries),
        "rejects": sum(s["rejects"] for s in summaries),
        "captions": sum(s["captions"] for s in summaries),
        "per_bucket": dict(sorted(per_bucket.items(), key=lambda kv: int(kv[0]))),
        "per_source": dict(tot["per_source"].most_common()),
        "per_format": dict(tot["per_format"].most_common()),
        "per_reason": dict(tot["per_reason"].most_common()),
        "counters": dict(tot["counters"]),
    }


def _write_shards_table(output: Path, summaries: list[dict]) -> None:
    write_parquet_atomic(pa.Table.from_pylist([
        {"shard": s["shard"], "part": s["part"], "tar_size": s["tar_size"], "samples": s["samples"],
         "rejects": s["rejects"], "idx": s["idx"], "seconds": s["seconds"]} for s in summaries],
        schema=pa.schema([("shard", pa.string()), ("part", pa.string()), ("tar_size", pa.int64()),
                          ("samples", pa.int64()), ("rejects", pa.int64()), ("idx", pa.string()),
                          ("seconds", pa.float64())])), output / layout.SHARDS)


def _version() -> str | None:
    try:
        from importlib.metadata import version
        return version("aimv2")
    except Exception:
        return None


def _check_output_is_ours(output: Path) -> None:
    """-o must be new, empty, or a manifest (being) built: never a folder of other files it would mix into."""
    if not output.is_dir():
        if output.exists():
            raise ManifestBuildError(f"-o {output} is a file; pass a directory for the manifest")
        return
    entries = [p.name for p in output.iterdir()]
    if entries and not any(e in layout.ENTRIES or e.startswith(LOCK_NAME) for e in entries):
        raise ManifestBuildError(f"-o {output} is a non-empty folder that holds no manifest (e.g. {sorted(entries)[0]}); "
                                 "pass a new or empty directory, or an existing manifest to resume")


def _replaced_summary(output: Path) -> dict:
    """The _manifest.json this merge replaces (its caption sets carry over). One that is damaged or of an
    unknown schema is named and left in place: replacing it would drop what it records."""
    if not layout.is_manifest(output):
        return {}
    try:
        return read_meta(layout.manifest_json(output))
    except ManifestMismatch as e:
        raise ManifestBuildError(f"refusing to replace it: {e}") from None


def _check_no_strangers(output: Path, parts: set[str]) -> None:
    """A part file of a tar that is no longer among the inputs would still be read by every
    `samples/*.parquet` glob: refuse to write a manifest that disagrees with its own files."""
    strangers = [f for d in (layout.SAMPLES, layout.REJECTS) for f in sorted((output / d).glob(layout.PART_GLOB))
                 if layout.part_of(f.name) not in parts]
    if strangers:
        raise ManifestBuildError(
            f"{output}: {len(strangers)} part files belong to tars that are not among the inputs (e.g. "
            f"{strangers[0]}); pass those tars as INPUT too, or delete the stray parts (and their _parts/*.json)")


def _align_caption_columns(output: Path, summaries: list[dict], caption_sets: dict) -> dict:
    """Sample parts written after `aimv2 caption attach` lack its syn_* columns; add them as nulls so every
    part has the same schema (a plain glob must read them all). Returns {set: parts not covered}."""
    uncovered = {}
    cols = [cs["column"] for cs in caption_sets.values()]
    if not cols:
        return uncovered
    for s in summaries:
        path = _paths(output, s["part"])["samples"]
        t = pq.read_table(path)
        missing = [c for c in cols if c not in t.column_names]
        for c in missing:
            t = t.append_column(pa.field(c, SYN_TYPE), pa.nulls(t.num_rows, SYN_TYPE))
            name = c[len(SYN_PREFIX):]
            uncovered.setdefault(name, []).append(s["part"])
        if missing:
            write_parquet_atomic(t, path)
    return {k: len(v) for k, v in uncovered.items()}


def _remove_stale_temps(output: Path) -> None:
    # Left by killed writers; only removed at merge time, when every tar is done and nobody writes.
    for d in (layout.SAMPLES, layout.REJECTS, layout.PARTS, layout.IDX, "."):
        for f in (output / d).glob(".*.tmp"):
            try:
                f.unlink()
            except OSError:
                pass
