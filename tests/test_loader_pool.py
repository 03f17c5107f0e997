"""Segment boundaries (issue 21 point 6): the pil decoder's worker processes live as long as the loader,
the next segment's share is read while this one trains, and nothing is left running after close."""
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _loader_fixtures import build_manifest  # noqa: E402

from aimv2data.loader import Loader  # noqa: E402
from aimv2data.loader.samples import SampleTable  # noqa: E402

torch.set_num_threads(1)
P = 14
KW = dict(resolution=28, batch_size=8, seed=1, rank=0, world_size=2, mix="rows")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    # 4 row groups on 2 ranks: each segment's share is another pair of them
    return build_manifest(tmp_path_factory.mktemp("pool"), n=96, seed=1, shards=2, patch_size=P, aspects=[1.0],
                          parts=4)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _segments(loader, n):
    out, pids = [], []
    for _ in range(n):
        out.append([(b.global_step, b.keys, b.images.clone()) for b in loader])
        pids.append(loader.worker_pids())
    return out, pids


def _same(a, b):
    return len(a) == len(b) and all(x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2])
                                    for sa, sb in zip(a, b) for x, y in zip(sa, sb))


def test_workers_persist_across_segments_and_make_the_same_batches(manifest):
    with Loader(manifest, workers=2, **KW) as pooled:
        got, pids = _segments(pooled, 3)
        assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2]      # the same processes every segment
        assert all(_alive(p) for p in pids[0])
        assert len({tuple(r["chunks"]) for r in pooled.stats["reads"]}) > 1   # the shares did change
    with Loader(manifest, workers=2, persistent_workers=False, read_ahead=False, **KW) as old:
        ref, _ = _segments(old, 3)
    with Loader(manifest, workers=0, **KW) as inline:
        here, _ = _segments(inline, 3)
    assert _same(got, ref) and _same(got, here)                         # same seed, same samples and pixels


def test_the_next_share_is_read_while_the_segment_trains(manifest, monkeypatch):
    where = []
    real = SampleTable.__init__

    def recording(self, *a, **k):
        where.append(threading.current_thread().name)
        real(self, *a, **k)

    monkeypatch.setattr(SampleTable, "__init__", recording)
    with Loader(manifest, workers=2, **KW) as loader:
        where.clear()
        for _ in range(4):
            n = len(loader)
            for i, _ in enumerate(loader):
                if i == n - 1:                 # the segment's last batch: the next share is already read
                    assert loader._next is not None and loader._next.ready(timeout=60)
        later = loader.stats["reads"][1:]
        assert later and all(r["ahead"] for r in later)     # every share after the first came from the thread
        assert set(where) == {"aimv2-read-ahead"}            # none was read at a boundary


def test_close_and_exit_leave_no_worker_processes(manifest, tmp_path):
    loader = Loader(manifest, workers=2, **KW)
    next(iter(loader))
    pids = loader.worker_pids()
    assert pids and all(_alive(p) for p in pids)
    loader.close()
    assert not any(_alive(p) for p in pids)
    # a process that exits without close() takes its workers with it
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from aimv2data.loader import Loader; "
              f"L = Loader({str(manifest)!r}, workers=2, **{KW!r}); next(iter(L)); print(*L.worker_pids())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    child = [int(x) for x in out.stdout.split()]
    assert len(child) == 2 and not any(_alive(p) for p in child)
