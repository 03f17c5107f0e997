"""Loading the weights a path names, for export, probe and embed. Which weights a path names (a run, its
checkpoints, one file, a transformers folder), and what a damaged checkpoint does to that, is decided
once for them and for `train --init` / `--resume`: train/checkpoint.py `resolve_weights`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ..model.interop import load_encoder
from ..train.checkpoint import WeightsError, resolve_weights

__all__ = ["WeightsError", "load_weights", "read_encoder", "resolve_weights", "say"]


def say(message: str) -> None:
    """A one-line notice on stderr (a damaged checkpoint skipped)."""
    print(f"aimv2: {message}", file=sys.stderr, flush=True)


def load_weights(path: str | os.PathLike, heads: int | None = None, step: int | None = None, notify=say):
    """The encoder `path` names (resolve_weights: a run -> its newest intact checkpoint, or `step`; one
    checkpoint file; anything interop.load_encoder reads), with an error that says what to do."""
    weights, _ = resolve_weights(path, step, notify)
    return read_encoder(weights, heads)


def read_encoder(weights: str | os.PathLike, heads: int | None = None):
    """The encoder in `weights`, a path resolve_weights returned (already checked against its CRC-32s:
    damaged bytes would otherwise export, or embed, silently)."""
    try:
        return load_encoder(Path(weights), heads=heads)
    except (ValueError, FileNotFoundError) as e:
        raise WeightsError(f"cannot load the encoder from {weights}: {e}") from None
    except KeyError as e:
        raise WeightsError(f"cannot load the encoder from {weights}: tensor or config field {e} is missing") from None
