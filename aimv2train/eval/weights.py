"""Which weights a path names (a run, its checkpoints, one file, a transformers folder) and loading
them: shared by export, probe and embed."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..model.interop import load_encoder
from ..train import checkpoint as ck


class ExportError(ValueError):
    """An export that cannot be done; the message says what and what to do."""


def resolve_checkpoint(path: str | os.PathLike, step: int | None = None) -> tuple[Path, Path | None]:
    """(checkpoint or weights path, run directory or None) for a run dir, checkpoints dir or file.

    Anything that is not a training run (a transformers folder, ml-aim weights) is returned as is."""
    p = Path(path)
    if not p.exists():
        raise ExportError(f"{p} does not exist")
    if p.is_file():
        if step is not None:
            raise ExportError(f"--step {step} picks a checkpoint of a run directory; {p} is one file already")
        run = p.parent.parent if p.parent.name == "checkpoints" and _run_config(p.parent.parent) else None
        return p, run
    ckdir = ck.checkpoints_dir(p)
    run = p if ckdir != p else None
    if run is None and ck.list_checkpoints(p) and _run_config(p.parent) is not None:
        run = p.parent  # RUN/checkpoints was passed
    ckpts = ck.list_checkpoints(ckdir)
    if not ckpts:
        if run is not None:
            raise ExportError(f"{p}: a run directory without checkpoints (nothing in {ckdir}); was the run "
                              f"stopped before its first save? Resume it with `aimv2 train ... --resume`")
        if step is not None:
            raise ExportError(f"--step {step}: {p} is not a training run (no checkpoints/step_*.pt)")
        return p, None  # a transformers folder or a directory load_encoder understands
    if step is None:
        return ckpts[-1][1], run
    found = [f for s, f in ckpts if s == step]
    if not found:
        raise ExportError(f"{ckdir} has no checkpoint for step {step}; it has steps {[s for s, _ in ckpts]}")
    return found[0], run


def load_weights(path: str | os.PathLike, heads: int | None = None, step: int | None = None):
    """The encoder of a run (its newest checkpoint, or `step`), of one checkpoint, or of anything
    interop.load_encoder reads (a file, a transformers folder), with an error that says what to do. One of
    our checkpoints is first checked against its CRC-32s: damaged bytes would otherwise export (or embed)
    silently."""
    path, _ = resolve_checkpoint(path, step)
    p = Path(path)
    if p.is_file() and ck.is_zip_checkpoint(p):
        try:
            ck.verify_checkpoint(p)
        except ck.CheckpointDamaged as e:
            raise ExportError(f"{e}; use an intact one (`--step`, or the previous file in its checkpoints/)") from None
    try:
        return load_encoder(path, heads=heads)
    except (ValueError, FileNotFoundError) as e:
        raise ExportError(f"cannot load the encoder from {path}: {e}") from None
    except KeyError as e:
        raise ExportError(f"cannot load the encoder from {path}: tensor or config field {e} is missing") from None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_config(run: Path) -> dict | None:
    """RUN/run.json, the trainer's resolved settings (`config.json` in runs written before the rename)."""
    return _read_json(run / "run.json") or _read_json(run / "config.json")
