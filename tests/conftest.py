import concurrent.futures.thread
import gc
import os
import sys
import threading
import time

import pytest

from _procs import become_subreaper, command, end, leftovers, now_ticks
from _timeouts import scale

# Quiet, offline third-party behaviour for every test (img2dataset pulls albumentations and wandb).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# How long a test's processes get to end on their own after it (a DataLoader's workers, a server's
# children shut down asynchronously) before they count as left behind.
GRACE_S = float(os.environ.get("AIMV2_TEST_LEFTOVER_GRACE_S", "10"))
_SESSION = {}


@pytest.hookimpl(trylast=True)   # after pytest-timeout's own configure has read its settings
def pytest_configure(config):
    _SESSION["since"] = now_ticks()
    become_subreaper()   # orphaned grandchildren stay ours to find (tests/_procs.py)
    if getattr(config, "_env_timeout", None):
        config._env_timeout *= scale()


def pytest_collection_modifyitems(config, items):
    s = scale()
    if s == 1:
        return
    for item in items:
        for mark in item.iter_markers("timeout"):
            if mark.args:
                mark.args = (mark.args[0] * s, *mark.args[1:])


def _wait_gone(since: int, grace: float) -> list[int]:
    deadline = time.monotonic() + grace
    while (left := leftovers(since)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(autouse=True)
def no_leftover_processes(request):
    """Every test ends the processes it started (issue 20 point 19): one that is still alive GRACE_S
    after the test fails it, by name, and is ended here so that it cannot hold the run's output open."""
    since = now_ticks()
    yield
    gc.collect()   # a loader the test dropped (e.g. inside a raised error's traceback) ends its workers now
    left = _wait_gone(since, GRACE_S * scale())
    if left:
        names = "; ".join(f"{p} {command(p)}" for p in left)
        end(left)
        pytest.fail(f"{request.node.nodeid} left processes behind: {names}", pytrace=False)


def _idle_pool_worker(t: threading.Thread) -> bool:
    """A ThreadPoolExecutor worker waiting for work (a pool nobody shut down, e.g. a library's): it does not
    keep the interpreter alive, since concurrent.futures wakes and joins idle workers at exit. One that is
    running a task is deeper in its stack than the worker loop."""
    frame = sys._current_frames().get(t.ident)
    return frame is not None and frame.f_code is concurrent.futures.thread._worker.__code__


def pytest_sessionfinish(session, exitstatus):
    """Last line of defence: nothing the run started outlives it, and no non-daemon thread keeps the
    interpreter (and so `make test`) from exiting after the summary."""
    left = _wait_gone(_SESSION.get("since", 0), GRACE_S)
    if left:
        print(f"\n[conftest] ending processes left behind: {'; '.join(f'{p} {command(p)}' for p in left)}")
        end(left)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    stuck = [t for t in threading.enumerate()
             if t is not threading.main_thread() and not t.daemon and not _idle_pool_worker(t)]
    for t in stuck:
        t.join(timeout=GRACE_S)
    stuck = [t for t in stuck if t.is_alive() and not _idle_pool_worker(t)]
    if stuck:
        print(f"\n[conftest] non-daemon threads still running at exit: {', '.join(t.name for t in stuck)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        _SESSION["exit_now"] = True


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _SESSION.get("exit_now"):   # they would keep the process alive after the summary: exit anyway
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(pytest.ExitCode.TESTS_FAILED))
