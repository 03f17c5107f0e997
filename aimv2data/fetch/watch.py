"""img2dataset's download workers, watched. multiprocessing.Pool replaces a worker that dies (killed for
memory, crashed, failing at start-up) but loses the shard it was downloading, and img2dataset's
`imap_unordered` then waits for that shard forever (CPython's Pool has no "broken pool" state, unlike
ProcessPoolExecutor). The pool's workers here are processes that report an exit nobody asked for; the main
thread, blocked in that wait, is woken with a real signal (nothing else ends a blocked lock wait) and the call
ends with `WorkerDied`, naming the worker: the summary is written and a rerun resumes the lost shard."""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import signal
import threading

WAKE = signal.SIGUSR1
GRACE_S = 2.0   # a worker ended by the signal that also reached us (Ctrl-C, scancel): our handler decides


class WorkerDied(RuntimeError):
    pass


def exit_reason(code: int) -> str:
    if code >= 0:
        return f"exited with status {code}"
    name = signal.Signals(-code).name
    return f"was killed by {name}" + (" (the kernel's out-of-memory killer sends it)" if name == "SIGKILL" else "")


class _Watch:
    """The first unasked-for worker exit of one download call, and the wake of the main thread."""

    def __init__(self):
        self.main = threading.main_thread().ident
        self.lock = threading.Lock()
        self.stopping = threading.Event()   # the call is ending anyway: wake nobody
        self.died: str | None = None
        self.waker: threading.Thread | None = None

    def report(self, pid: int, code: int) -> None:
        with self.lock:
            if self.died is not None or self.stopping.is_set():
                return
            self.died = f"its download worker (pid {pid}) {exit_reason(code)}; the shard it held is lost"
            self.waker = threading.Thread(target=self._wake, name="aimv2-fetch-worker-died", daemon=True)
            self.waker.start()

    def _wake(self) -> None:
        if self.stopping.wait(GRACE_S):
            return
        with self.lock:   # never after stop() has begun: the handler is ours until stop() ends
            if not self.stopping.is_set():
                signal.pthread_kill(self.main, WAKE)

    def on_wake(self, signum, frame) -> None:
        if self.died is not None and not self.stopping.is_set():
            raise WorkerDied(self.died)

    def stop(self) -> None:
        with self.lock:
            self.stopping.set()
        if self.waker is not None:
            self.waker.join()
        signal.sigpending()   # a system call: a wake already sent is delivered here, to on_wake, which ignores it


_WATCH: _Watch | None = None   # the download call being watched (one at a time: it holds the main thread)


class _WatchedProcess(multiprocessing.context.SpawnProcess):
    """A pool worker that reports when it ended without the pool (or we) ending it. The pool's own thread
    joins every exited worker; terminate() is how the pool, and our Ctrl-C path, end them. Module-level:
    the spawned child unpickles it by name."""

    def terminate(self):
        self._asked = True
        super().terminate()

    def kill(self):
        self._asked = True
        super().kill()

    def join(self, timeout=None):
        super().join(timeout)
        code = self.exitcode
        if code not in (None, 0) and not getattr(self, "_asked", False) and _WATCH is not None:
            _WATCH.report(self.pid, code)


class _WatchedSpawnContext(multiprocessing.context.SpawnContext):
    Process = _WatchedProcess


@contextlib.contextmanager
def watched_pool():
    """For one img2dataset download call with its multiprocessing distributor: its pool's workers watched.
    Needs the main thread (signals); elsewhere the call runs unwatched, as img2dataset runs it."""
    import img2dataset.distributor as dist

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _WATCH
    _WATCH = watch = _Watch()
    context, original = _WatchedSpawnContext(), dist.get_context
    old = signal.signal(WAKE, watch.on_wake)
    dist.get_context = lambda method=None: context if method == "spawn" else original(method)
    try:
        yield
    finally:
        dist.get_context = original
        watch.stop()
        signal.signal(WAKE, old)
        _WATCH = None
