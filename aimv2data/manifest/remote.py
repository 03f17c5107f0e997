"""`aimv2 shard` into a URL (s3://bucket/manifest), and one Ray task per tar.

A manifest at a URL is built in a local staging directory holding a copy of what the URL already has
(the small parquet parts and jsons, never the tars), by the same per-tar code as a local one. Each tar's
files are uploaded as soon as it is done, its `_parts/<part>.json` last, so an interrupted run resumes
from what the URL holds; `_manifest.json` goes up last of all, so a manifest at a URL looks complete only
when it is. Object PUTs are all-or-nothing: no reader ever sees half a file.

Ray: `ray_results` runs `process_tar` as one task per tar on the cluster (`--ray-address`, default:
whatever `ray.init` finds) and yields the results as they finish, in the same shape as the
multiprocessing pool, so resume, failures and the merge are the same code. A task writes its parts
into the output directory when its node sees it (one machine, a shared filesystem), else into a
directory of its own and returns the bytes for the driver to write (manifests at a URL, whose `shard`
column holds URLs or absolute paths).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from aimv2data import storage
from aimv2data.manifest import layout


def build_at_url(inputs: list[str], url: str, build_manifest, error, **kw) -> dict:
    """`build_manifest` into a local staging copy of `url`, uploading as it goes (`error`: the exception
    class for bad input; both passed in by manifest.build, which imports this module)."""
    ManifestBuildError = error
    url = url.rstrip("/")
    try:
        storage.check_reachable(url, for_writing=True)
    except storage.StorageError as e:
        raise ManifestBuildError(str(e)) from None
    fs, root = storage.filesystem(url)
    if any(not storage.is_url(i) for i in inputs):
        kw["absolute_paths"] = True          # a relative path from an object-store manifest to a local tar means nothing
    staging = Path(tempfile.mkdtemp(prefix="aimv2-shard-"))
    try:
        _download(fs, root, staging)
        t0 = time.time()

        def upload(summary: dict) -> None:
            part = summary["part"]
            p = layout.part_paths(staging, part)
            if summary.get("idx") and summary["idx"].startswith(str(staging)):
                summary["idx"] = url + summary["idx"][len(str(staging)):]
                from aimv2data.manifest.schema import write_json_atomic

                write_json_atomic(summary, p["done"])
            for f in (p["samples"], p["rejects"], layout.idx_path(staging, part), p["done"]):   # done-marker last
                if f.is_file():
                    _put(fs, f, f"{root}/{f.relative_to(staging).as_posix()}", url)

        report = build_manifest(inputs, staging, on_tar_done=upload, **kw)
        if report["merged"]:
            # the merge rewrote shards.parquet (and parts given new caption columns): those, then the manifest
            for f in sorted(staging.rglob("*")):
                rel = f.relative_to(staging).as_posix()
                if f.is_file() and rel != layout.MANIFEST_JSON and not f.name.endswith(".tmp") \
                        and f.stat().st_mtime >= t0:
                    _put(fs, f, f"{root}/{rel}", url)
            _put(fs, layout.manifest_json(staging), f"{root}/{layout.MANIFEST_JSON}", url)
        report["output"] = url
        if "idx" in report:
            from collections import Counter

            report["idx"] = Counter("none" if not i else "manifest" if i.startswith(url) else "beside"
                                    for i in _idx_paths(staging))
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def staged_manifest(url: str):
    """A local copy of the manifest at `url` (its parquet parts and jsons, never tars) and `put(path)`,
    which uploads one local file (or, remove=True, deletes its object) as soon as it is final."""
    url = url.rstrip("/")
    storage.check_reachable(url)
    fs, root = storage.filesystem(url)
    staging = Path(tempfile.mkdtemp(prefix="aimv2-manifest-"))
    try:
        _download(fs, root, staging)

        def put(path: Path, remove: bool = False) -> None:
            key = f"{root}/{Path(path).relative_to(staging).as_posix()}"
            if remove:
                try:
                    fs.rm_file(key)
                except FileNotFoundError:
                    pass
            else:
                _put(fs, Path(path), key, url)
        yield staging, put
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _idx_paths(staging: Path) -> list:
    from aimv2data.manifest.schema import read_json

    return [read_json(p).get("idx") for p in sorted((staging / layout.PARTS).glob("*.json"))]


def _download(fs, root: str, staging: Path) -> None:
    """What the URL already holds of this manifest (small files only: parts, jsons, idx)."""
    try:
        found = fs.find(root) if fs.exists(root) else []
    except Exception as e:
        raise storage.friendly(e, fs.unstrip_protocol(root)) from None
    for key in found:
        rel = key[len(root):].lstrip("/")
        if not rel or rel.endswith(".tmp"):
            continue
        dest = staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(fs.cat_file(key))


def _put(fs, local: Path, key: str, url: str) -> None:
    try:
        fs.pipe_file(key, local.read_bytes())
    except Exception as e:
        raise storage.friendly(e, url) from None


# --- Ray ---------------------------------------------------------------------------------------------

def _tar_task(job, output, opts, process_tar):
    """On a Ray worker: process one tar straight into `output` when this node sees it (one machine, or a
    shared filesystem); else into a private directory, returning the files' bytes for the driver to write
    (possible when the `shard` column holds absolute paths or URLs, as for every manifest at a URL)."""
    if os.path.isdir(output) and os.access(output, os.W_OK):
        try:
            return job, process_tar(job, output, opts), {}, None, None
        except Exception as e:
            return job, None, None, None, f"{type(e).__name__}: {e}"
    if not (opts.absolute_paths or storage.is_url(job.path)):
        return job, None, None, None, (f"this Ray node does not see the output {output}: put it on a filesystem "
                                       "every node shares, or write the manifest to a URL (s3://...)")
    tmp = Path(tempfile.mkdtemp(prefix="aimv2-shard-task-"))
    try:
        summary = process_tar(job, str(tmp), opts)
        files = {f.relative_to(tmp).as_posix(): f.read_bytes() for f in tmp.rglob("*") if f.is_file()}
        return job, summary, files, str(tmp), None
    except Exception as e:   # report this tar, keep the others going (as the process pool does)
        return job, None, None, None, f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ray_results(tasks, ray_address: str | None, process_tar):
    """Yield (job, summary, error) per tar as Ray tasks finish; each tar's files land in its output dir,
    `_parts/<part>.json` last."""
    import ray

    from aimv2data.cluster import connect_ray
    from aimv2data.manifest.schema import write_json_atomic

    connect_ray(ray_address)
    remote = ray.remote(num_cpus=1, max_retries=2)(_tar_task)
    refs = [remote.remote(job, out, opts, process_tar) for job, out, opts in tasks]
    output = {id(r): Path(out) for r, (_, out, _) in zip(refs, tasks)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        out = output[id(done[0])]
        job, summary, files, tmp, err = ray.get(done[0])
        if err:
            yield job, None, err
            continue
        if tmp is None:                      # written in place by the worker
            yield job, summary, None
            continue
        if summary.get("idx") and summary["idx"].startswith(tmp):
            summary["idx"] = str(out.resolve()) + summary["idx"][len(tmp):]
        for rel, data in sorted(files.items()):
            if not rel.startswith(f"{layout.PARTS}/"):
                storage.write_bytes(str(out / rel), data)
        write_json_atomic(summary, layout.part_paths(out, summary["part"])["done"])
        yield job, summary, None
