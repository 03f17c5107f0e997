"""The `dali` decoder decodes ahead (issue 15): a background thread makes steps N+1.. while the consumer
uses step N. Same batches as the synchronous path, pixel for pixel; errors surface at their step; an
abandoned iteration stops its thread; resume works as before. (The wait-time figure with a slow consumer
is a benchmark: benchmarks/bench_dali_ahead.py.)"""
import threading
import time

import pytest
import torch

from _loader_fixtures import build_manifest
from aimv2data.loader import Loader
from aimv2data.loader.prefetch import ahead

torch.set_num_threads(1)


# --- the generic decode-ahead iterator (no DALI needed) ------------------------------------------------

def test_ahead_yields_the_same_items_in_order_and_runs_ahead():
    made = []
    two_made = threading.Event()

    def items():
        for i in range(6):
            made.append(i)
            if len(made) == 3:
                two_made.set()
            yield i

    it = ahead(items(), depth=2)
    assert next(it) == 0
    # while the consumer holds item 0, the thread makes items 1 and 2 (the queue holds 2) and no more
    assert two_made.wait(10)
    time.sleep(0.05)
    assert made == [0, 1, 2, 3] or made == [0, 1, 2]     # 3 may be made and wait at the full queue
    assert list(it) == [1, 2, 3, 4, 5]


def test_ahead_reraises_at_the_failing_item_and_stops_on_close():
    def failing():
        yield 0
        yield 1
        raise ValueError("bad step 2")

    it = ahead(failing(), depth=4)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="bad step 2"):
        next(it)

    def endless():
        i = 0
        while True:
            yield i
            i += 1

    before = threading.active_count()
    it = ahead(endless(), depth=2)
    assert next(it) == 0
    it.close()                               # a `break` in the consumer
    assert threading.active_count() == before


def test_ahead_rejects_a_zero_depth():
    with pytest.raises(ValueError, match="depth"):
        list(ahead(iter([1]), depth=0))


# --- the dali loader -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    pytest.importorskip("nvidia.dali")
    return build_manifest(tmp_path_factory.mktemp("ahead"), n=64, seed=5, photo=True, min_side=64, max_side=200,
                          aspects=[0.5, 0.75, 1.0, 4 / 3, 2.0], exif_every=5, corrupt=(11,))


def _same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        fields = lambda b: (b.source_epoch, b.global_step, b.keys, b.grid, b.captions)  # noqa: E731
        assert fields(x) == fields(y)
        assert x.replaced == y.replaced
        assert torch.equal(x.images, y.images)


@pytest.mark.parametrize("kw", [dict(resolution=56, batch_size=8, seed=1),
                                dict(native_res=True, batch_patches=4096, seed=2)], ids=["fixed", "native"])
def test_dali_ahead_batches_equal_the_synchronous_path(manifest, kw):
    sync = Loader(manifest, decoder="dali", dali_ahead=False, **kw)
    fast = Loader(manifest, decoder="dali", **kw)
    assert fast.cfg.dali_ahead                                  # the default for dali
    _same(list(sync), list(fast))
    assert sync.stats == fast.stats
    if not kw.get("native_res"):
        assert fast.stats["replaced"] == 1                      # the corrupt row, replaced identically


def test_dali_ahead_decodes_the_next_steps_while_the_consumer_holds_one(manifest):
    loader = Loader(manifest, decoder="dali", resolution=56, batch_size=8, seed=1, prefetch_factor=2)
    made, threads = [], set()
    ahead_done = threading.Event()
    make = loader.maker.make

    def recording(step):
        b = make(step)
        made.append(step)
        threads.add(threading.current_thread().name)
        if len(made) >= 3:
            ahead_done.set()
        return b

    loader.maker.make = recording
    n = len(loader)                                             # steps in this segment (the loader moves on after)
    it = iter(loader)
    first = next(it)
    assert first.global_step == 0
    assert ahead_done.wait(30), made                            # steps 1 and 2 made without being asked
    assert made[:3] == [0, 1, 2] and threads == {"aimv2-decode-ahead"}   # made off the consumer's thread
    rest = list(it)
    assert [b.global_step for b in rest] == list(range(1, n))


def test_dali_ahead_resumes_after_a_break_like_the_synchronous_path(manifest):
    kw = dict(decoder="dali", resolution=56, batch_size=8, seed=4)
    full = list(Loader(manifest, dali_ahead=False, **kw))
    loader = Loader(manifest, **kw)
    threads = threading.active_count()
    head = []
    for b in loader:
        head.append(b)
        if len(head) == 3:
            break
    state = loader.state_dict()
    assert state["offset"] == 3
    resumed = Loader(manifest, **kw)
    resumed.load_state_dict(state)
    _same(head + list(resumed), full)
    tail = list(loader)                                         # the same loader goes on from step 3 too
    _same(head + tail, full)
    assert threading.active_count() <= threads
