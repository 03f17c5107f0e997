"""Atomic file writes, the one way this code base writes a file others read: write a temp file beside
the target, then os.replace it in. A reader (or a resumed run) sees the old file or the new one, never
half of one.

Temp names start with '.' and end in '.tmp' (`.NAME.PID.RANDOM.tmp`), so no `*.parquet` / `*.pt` glob
matches a write in progress, and cleaners can find leftovers of killed writers by that pattern.
"""
from __future__ import annotations

import errno
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
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


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would briefly set 0 for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def is_disk_full(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is a full disk or quota. torch.save reports ENOSPC only as
    "unexpected pos N vs M" from its zip writer, chained to "file write failed"."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "unexpected pos" in text or "file write failed" in text:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every non-blank line of a JSON-lines file, parsed (the one JSON-lines reader). A torn LAST line (the
    disk filled or the process died mid-write) is dropped: what it logged is redone after a resume. A
    damaged line elsewhere is an error naming the file and line."""
    lines = Path(path).read_text(errors="replace").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if all(not rest.strip() for rest in lines[i + 1:]):
                break
            raise ValueError(f"{path}, line {i + 1}: not a JSON record ({line[:60]!r}); the lines after it are "
                             "intact: delete or repair that line") from None
        out.append(rec)
    return out
