"""Which processes a test run left behind, read from /proc (no psutil). The pytest process makes itself
a child subreaper (Linux prctl), so a grandchild whose parent died (a loader worker of a killed `aimv2`
subprocess) is re-parented to pytest instead of init: every process a test started stays a descendant of
pytest, and only those are looked at, never another job's. A leftover holding the CI's stdout pipe keeps
`make test` waiting after pytest's summary, so the conftest finds them, names them and ends them."""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

_CLK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, session id, start time in clock ticks since boot) of `pid`, or None when it is gone (or a
    zombie, which holds nothing: its parent only has to reap it)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()   # the command name in (...) may hold spaces
    if fields[0] in "ZX":
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def now_ticks() -> int:
    """This moment in the units of /proc/PID/stat's start time."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK)


def command(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    return "?"


def children(pid: int) -> list[int]:
    """The live children of `pid`, oldest first."""
    kids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[0] == pid:
                kids.append((st[2], int(d.name)))
    return [p for _, p in sorted(kids)]


def become_subreaper() -> bool:
    """Orphaned descendants come to this process rather than to init (Linux >= 3.4)."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0   # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def leftovers(since: int) -> list[int]:
    """Live descendants of this process started at or after `since` (ticks), through processes that were
    all started since then too: what descends from an older process (a module fixture's Ray cluster,
    started before the test) is that fixture's to end."""
    me = os.getpid()
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is not None and st[2] >= since:
                parent[int(d.name)] = st[0]

    def mine(pid: int) -> bool:
        seen = set()
        while pid in parent and pid not in seen:
            seen.add(pid)
            pid = parent[pid]
            if pid == me:
                return True
        return False

    return sorted(p for p in parent if p != me and mine(p) and not _singleton(p))


# Helpers Python (and wandb) start once per process on first use and keeps for the process's life by design; they
# end when this process does (they read a pipe from it), so they are not a test's leftovers.
SINGLETONS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver",
              "wandb-core")   # wandb's service: one per process, it watches its --pid and exits with it


def _singleton(pid: int) -> bool:
    return any(s in command(pid) for s in SINGLETONS)


def end(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(OSError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_stat(p) for p in pids):
            time.sleep(0.05)
