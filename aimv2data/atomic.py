"""Atomic file writes, the one way this code base writes a file others read: write a temp file beside
the target, then os.replace it in. A reader (or a resumed run) sees the old file or the new one, never
half of one.

Temp names start with '.' and end in '.tmp' (`.NAME.PID.RANDOM.tmp`), so no `*.parquet` / `*.pt` glob
matches a write in progress, and cleaners can find leftovers of killed writers by that pattern.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Callable


def tmp_name(path: str | os.PathLike) -> Path:
    """A fresh temp path beside `path` (same directory, so os.replace is a rename)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result to `path`; the temp file is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json_atomic(obj, path: str | os.PathLike, indent: int = 1, default=None) -> None:
    """`obj` as JSON (one trailing newline); `default` as json.dumps' (e.g. str for paths)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every non-blank line of a JSON-lines file, parsed (the one JSON-lines reader)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
