"""One writer per manifest directory: `flock` locks held for the whole `aimv2 shard` run (and per fetch
output directory, the same way, for `aimv2 fetch`: `tool` names the command in the messages).

    MANIFEST/.lock              a whole run (or --merge-only) holds it exclusively; a --part i/N run
                                holds it shared, so parallel slices of one build coexist
    MANIFEST/.lock-part-i-of-N  a --part run holds it exclusively: the same slice twice is refused

Each lock file records its holder (pid, host, start time, command line), so a refusal names it. The
kernel drops a flock when its process ends in any way (exit, exception, kill -9), so a lock file left
behind by a killed run is stale by construction: the next run takes it over and overwrites the holder.
On a filesystem without flock support the run goes on unlocked, with a one-line notice.

`output_lock(..., tool=...)` is the same lock for any other folder with one writer (`aimv2 fetch`'s output,
`aimv2 train`'s run folder).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path


LOCK_NAME = ".lock"


class LockHeld(RuntimeError):
    """Another live process writes this manifest."""


def _holder_text(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process (holder unknown)"
    if not h:
        return "another process (holder unknown)"
    return (f"pid {h.get('pid')} on {h.get('host')} since {h.get('started')} "
            f"(`{' '.join(h.get('argv') or [])}`)")


def _take(path: Path, exclusive: bool, argv: list[str] | None, tool: str = "aimv2 shard"):
    """Open and flock `path` without waiting; returns the open file, None when the filesystem has no
    flock, raises BlockingIOError when it is held."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise
    except OSError as e:
        f.close()
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            print(f"{tool}: {path.parent} cannot be locked ({e.strerror}): make sure no other run writes "
                  "it", file=sys.stderr, flush=True)
            return None
        raise
    if exclusive:
        try:  # who holds it, for the message a second run prints; best effort (a full disk may refuse it)
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "argv": argv if argv is not None else sys.argv}) + "\n")
            f.flush()
        except OSError:
            pass
    return f


def _busy_parts(output: Path) -> list[str]:
    busy = []
    for p in sorted(output.glob(".lock-part-*")):
        try:
            with open(p, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy.append(f"{p.name[len('.lock-'):]}: {_holder_text(p)}")
        except OSError:
            pass
    return busy


@contextmanager
def output_lock(output: str | os.PathLike, part: tuple[int, int] | None = None, argv: list[str] | None = None,
                tool: str = "aimv2 shard"):
    """Hold MANIFEST's lock for the block; LockHeld (naming the holder) if another run has it."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    main = output / LOCK_NAME
    held = []
    try:
        try:
            held.append(_take(main, exclusive=part is None, argv=argv, tool=tool))
        except BlockingIOError:
            busy = _busy_parts(output)
            who = "; ".join(busy) if busy else _holder_text(main)
            raise LockHeld(f"{output} is being written by another `{tool}` run: {who}; wait for it to end "
                           "(a killed run's lock is released by the system, no cleanup needed)") from None
        if part is not None:
            lock = output / f".lock-part-{part[0]}-of-{part[1]}"
            try:
                held.append(_take(lock, exclusive=True, argv=argv))
            except BlockingIOError:
                raise LockHeld(f"{output}: part {part[0]}/{part[1]} is already being sharded by "
                               f"{_holder_text(lock)}; wait for it to end") from None
        yield
    finally:
        for f in reversed(held):
            if f is not None:
                try:
                    f.close()  # releases the flock
                except OSError:  # an unflushed holder line on a full disk; the descriptor is closed anyway
                    pass
