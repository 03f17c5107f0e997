"""img2dataset's download workers dying. multiprocessing.Pool replaces a worker that dies (killed for memory,
crashed, failing at start-up) but loses the shard it had, and img2dataset waits for that shard forever: a
fetch that never ends, at any scale where the kernel's OOM killer picks a worker. `aimv2 fetch` ends with one
line naming the worker instead, and a rerun resumes (aimv2data/fetch/watch.py)."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from _fetch_fixtures import start_fetch, summary, tar_keys, wait_mid_shard
from _procs import children, command
from _timeouts import scaled

from aimv2data import demo_corpus as demo
from aimv2data.serve import LoopbackServer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    demo.write_corpus(root)
    with LoopbackServer(directory=root / "images", hostile=False) as srv:
        yield srv, demo.write_url_lists(root, srv.base_url, hostile=False)["coyo"]


def _ends(proc, what: str) -> str:
    try:
        return proc.communicate(timeout=scaled(90))[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the fetch still ran 90 s after {what}: it waits for the lost shard forever")


def _spawned(pid: int) -> list[int]:
    """The multiprocessing (spawn) children of `pid`, oldest first: img2dataset's logger, then the pool's
    workers (the logger starts before the pool)."""
    return [c for c in children(pid) if "spawn_main" in command(c)]


def _completes(url_list, out: Path) -> None:
    proc = start_fetch(url_list, out)
    text = _ends(proc, "it started")
    assert proc.returncode == 0, text
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 80 and summary(out)["complete"]


@pytest.mark.slow
def test_a_worker_killed_mid_shard_ends_the_fetch_and_a_rerun_completes(served, tmp_path):
    srv, url_list = served
    out = tmp_path / "killed"
    srv.delay = 0.1   # ~0.5 s per 10-image shard with 2 threads
    try:
        proc = start_fetch(url_list, out)
        wait_mid_shard(proc, out, 1)
        worker = _spawned(proc.pid)[-1]
        os.kill(worker, signal.SIGKILL)   # what the kernel's OOM killer does
        text = _ends(proc, f"its download worker {worker} was killed")
    finally:
        srv.delay = 0.0
    assert proc.returncode == 1, text
    assert f"download worker (pid {worker}) was killed by SIGKILL" in text, text
    assert "rerun the same command to resume" in text, text
    assert summary(out)["complete"] is False
    _completes(url_list, out)


@pytest.mark.slow
def test_workers_that_fail_at_start_up_end_the_fetch(served, tmp_path):
    _, url_list = served
    site = tmp_path / "site"   # a sitecustomize that makes every multiprocessing child exit at once
    site.mkdir()
    (site / "sitecustomize.py").write_text('import os, sys\nif "--multiprocessing-fork" in sys.argv:\n    os._exit(3)\n')
    out = tmp_path / "broken"
    proc = start_fetch(url_list, out, env={"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    text = _ends(proc, "it started")
    assert proc.returncode == 1, text
    assert "download worker (pid" in text and "exited with status 3" in text, text
    _completes(url_list, out)
