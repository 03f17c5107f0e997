"""Helpers for the fetch and demo tests: read what fetch wrote, snapshot a directory."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import polars as pl
from _timeouts import scaled

REPO = Path(__file__).resolve().parents[1]


def read_shards(out: Path) -> dict[str, dict]:
    """key -> {"tar", "jpg" bytes, "txt", "json"} for every sample in every DIR/*.tar."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                s = samples.setdefault(key, {"tar": tar_path.name})
                assert ext not in s, f"duplicate member {m.name} in {tar_path}"
                data = tf.extractfile(m).read()
                s[ext] = json.loads(data) if ext == "json" else data.decode() if ext == "txt" else data
    return samples


def tar_keys(out: Path) -> list[str]:
    """Every image key in every tar, duplicates kept (a test asserts there are none)."""
    keys = []
    for tar_path in sorted(out.glob("*.tar")):
        with tarfile.open(tar_path) as tf:
            keys += [m.name.split(".")[0] for m in tf.getmembers() if m.name.endswith(".jpg")]
    return keys


def status_table(out: Path) -> pl.DataFrame:
    """img2dataset's per-sample status rows from every DIR/*.parquet."""
    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("[0-9]*.parquet"))], how="diagonal_relaxed")


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file under root but the lock file, whose holder line each
    run rewrites (aimv2data/manifest/lock.py)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def summary(out: Path) -> dict:
    return json.loads((out / "fetch_summary.json").read_text())


def decode(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# -- a fetch run as its own process group, to be killed or signalled mid-shard ----------------------
def start_fetch(url_list, out: Path, env: dict | None = None) -> subprocess.Popen:
    """`aimv2 fetch` of a COYO url list in 10-image shards, one download process with 2 threads."""
    cmd = [sys.executable, "-m", "cli.main", "fetch", "--allow-private-addresses", "--source", "coyo",
           "--url-list", str(url_list), "--output", str(out), "--shard-size", "10", "--processes", "1",
           "--download-threads", "2", "--timeout", "5"]
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})})


def shard_files(out: Path) -> tuple[set[str], set[str]]:
    """(finished shards, shards with a non-empty tar) of a fetch output."""
    done = {p.name[:-len("_stats.json")] for p in out.glob("*_stats.json")}
    tars = {p.stem for p in out.glob("*.tar") if p.stat().st_size > 0}
    return done, tars


def wait_mid_shard(proc: subprocess.Popen, out: Path, min_done: int, deadline_s: float = 120) -> set[str]:
    """Until at least `min_done` shards are finished and another one is half written."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < scaled(deadline_s):
        done, tars = shard_files(out) if out.exists() else (set(), set())
        if len(done) >= min_done and tars - done:
            return done
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    raise AssertionError("the fetch never got mid-shard")
