"""A run directory's files, without torch: RUN/checkpoints/step_NNNNNNNN.pt, RUN/run.json. Free of heavy
imports so that `aimv2 train` refuses a bad --manifest or --output (`start_problem`) in well under a second,
before the trainer's imports (torch: half a minute on a busy machine). The trainer meets the same problems
later by itself (the loader reads the manifest, `existing_run` guards --output)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from aimv2data.manifest.layout import missing_manifest

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def checkpoints_dir(path: str | os.PathLike) -> Path:
    """RUN/checkpoints for a run directory; any other directory is taken as a checkpoints directory."""
    p = Path(path)
    return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in `directory`, oldest first: THE way to find a run's
    checkpoints (the newest is the last; hidden temp files of saves in progress never match)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(out)


def run_config(run: Path) -> dict | None:
    """RUN/run.json, the trainer's resolved settings (`config.json` in runs written before the rename)."""
    return read_json_or_none(run / "run.json") or read_json_or_none(run / "config.json")


def read_json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def start_problem(manifest: str | None, val_manifest: str | None, out: str | None, resume: bool) -> str | None:
    """Why a training run with these paths cannot start, found by looking at files only: a local manifest
    without _manifest.json, or an --output that holds a run while --resume was not given. None: none found."""
    problem = missing_manifest(manifest) if manifest else None
    if not problem and val_manifest and (problem := missing_manifest(val_manifest)):
        problem = f"--val-manifest {val_manifest}: {problem}"
    return problem or (existing_run(out, resume) if out else None)


def existing_run(out: str | os.PathLike, resume: bool) -> str | None:
    """The refusal for an --output that already holds a run (a checkpoint) when --resume was not given."""
    existing = list_checkpoints(Path(out) / "checkpoints")
    if existing and not resume:
        return (f"{out} already holds a run (newest checkpoint {existing[-1][1].name}): pass --resume to "
                "continue it or choose another --output")
    return None
