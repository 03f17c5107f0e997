"""Where a manifest's files live (manifests/SPEC.md describes them): the one place that knows the
names. Everything outside aimv2data.manifest reads a manifest through these functions.

    MANIFEST/_manifest.json          buckets, counts, caption sets, options (written last)
    MANIFEST/samples/part-*.parquet  one row per kept image
    MANIFEST/rejects/part-*.parquet  one row per rejected member, with its reason
    MANIFEST/shards.parquet          one row per tar
    MANIFEST/_parts/<part>.json      per-tar summaries (a part is done when its summary exists)
    MANIFEST/idx/<part>.idx          DALI index of a tar's kept samples, where not beside the tar (`--idx`)
    MANIFEST/captions/<model>.parquet  a caption set `aimv2 caption generate` wrote (before it is attached)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from aimv2data import storage

MANIFEST_JSON = "_manifest.json"
SAMPLES = "samples"
REJECTS = "rejects"
SHARDS = "shards.parquet"
PARTS = "_parts"
IDX = "idx"
CAPTIONS = "captions"
SAMPLES_GLOB = f"{SAMPLES}/*.parquet"   # how the manifest describes its own files (`files` in _manifest.json)
REJECTS_GLOB = f"{REJECTS}/*.parquet"
# what a manifest directory holds (its writers' .lock and temp files aside)
ENTRIES = (MANIFEST_JSON, PARTS, SAMPLES, REJECTS, SHARDS, IDX, CAPTIONS)


def manifest_json(root: str | os.PathLike) -> Path:
    return storage.upath(root) / MANIFEST_JSON


def is_manifest(root: str | os.PathLike) -> bool:
    """Whether `root` holds a merged manifest (its _manifest.json exists)."""
    return manifest_json(root).is_file()


def missing_manifest(root: str | os.PathLike) -> str | None:
    """The one-line refusal for a local `root` without _manifest.json; None when it has one, or for a URL
    (its reader asks the store). Cheap: commands ask it before their heavy imports."""
    if storage.is_url(str(root)) or is_manifest(root):
        return None
    return f"{manifest_json(root)} not found: pass a manifest directory written by `aimv2 shard`"


def read_manifest_json(root: str | os.PathLike) -> dict | None:
    """The parsed _manifest.json, or None when it is missing or unreadable."""
    try:
        return json.loads(manifest_json(root).read_text())
    except (OSError, ValueError):
        return None


def sample_files(root: str | os.PathLike) -> list[Path]:
    """MANIFEST/samples/*.parquet in name order (temp files of writers in progress never match)."""
    return sorted((storage.upath(root) / SAMPLES).glob("*.parquet"))


def reject_files(root: str | os.PathLike) -> list[Path]:
    return sorted((storage.upath(root) / REJECTS).glob("*.parquet"))


PART_GLOB = "part-*.parquet"   # one tar's samples (or rejects) file, in samples/ and rejects/


def part_file(part: str) -> str:
    return f"part-{part}.parquet"


def part_of(file_name: str) -> str:
    """The part a samples or rejects file name belongs to: part_file's inverse."""
    return file_name[len("part-"):-len(".parquet")]


def part_paths(root: str | os.PathLike, part: str) -> dict[str, Path]:
    """The three files one tar's part writes: its samples, its rejects and its done-marker summary."""
    root = Path(root)
    return {"samples": root / SAMPLES / part_file(part),
            "rejects": root / REJECTS / part_file(part),
            "done": root / PARTS / f"{part}.json"}


def idx_path(root: str | os.PathLike, part: str) -> Path:
    """MANIFEST/idx/<part>.idx: a tar's DALI index when it is not written beside the tar."""
    return Path(root) / IDX / f"{part}.idx"


def caption_set_path(root: str, model: str) -> str:
    """MANIFEST/captions/<model>.parquet (root a path or URL): where `caption generate` writes by default."""
    return storage.join(root, CAPTIONS, f"{model}.parquet")
