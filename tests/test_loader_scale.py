"""The loader at scale (issue 13): rank-local shares, the source mixture, resume across world sizes, bad input."""
import json

import numpy as np
import pytest
import torch

from _loader_fixtures import build_manifest
from aimv2data.loader import Loader

torch.set_num_threads(1)
P = 4


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """90 % COYO rows, 10 % DFN rows, one source per part: row shares far from a dfn=0.9 mix."""
    return build_manifest(tmp_path_factory.mktemp("skewed"), n=1000, seed=2, shards=2, patch_size=P,
                          min_side=8, max_side=16, aspects=[1.0], sources=("dfn", "coyo"), source_weights=(0.1, 0.9),
                          parts=20, by_source=True, synthetic=False)


def _plan_shares(loader, steps):
    """Images per source over the first `steps` steps, from the segment plans (no decoding)."""
    names = loader.maker.names
    served = dict.fromkeys(names, 0)
    done = 0
    while done < steps:
        plan = loader.maker.plan[:steps - done]
        for si, n in zip(plan[:, 1].tolist(), plan[:, 4].tolist()):
            served[names[si]] += n
        done += len(plan)
        loader._next_segment()
    return served


@pytest.mark.parametrize("native", [True, False])
def test_realised_mix_matches_within_one_point_over_10000_steps(skewed, native):
    kw = dict(native_res=True, batch_patches=4096) if native else dict(resolution=8, batch_size=16)
    loader = Loader(skewed, mix="dfn=0.9,coyo=0.1", seed=0, **kw)
    served = _plan_shares(loader, 10_000)
    total = sum(served.values())
    assert abs(served["dfn"] / total - 0.9) < 0.01 and abs(served["coyo"] / total - 0.1) < 0.01
    epochs = loader.source_epochs()
    assert epochs["dfn"] > 5 * epochs["coyo"]                  # the small source repeats sooner


def test_batches_carry_one_source_and_stats_count_sources(skewed):
    loader = Loader(skewed, mix="dfn=0.5,coyo=0.5", native_res=True, batch_patches=4096, seed=1)
    n = 0
    for _, b in zip(range(20), loader):
        assert len(set(b.sources)) == 1 and len(b) * b.area == 4096 and b.padding == 0.0
        n += len(b)
    c = loader.stats["sources"]
    assert sum(c.values()) == n and abs(c["dfn"] / n - 0.5) < 0.1
    assert set(loader.state_dict()["source_epochs"]) == {"dfn", "coyo"}


def test_default_mix_is_table2_over_present_sources(skewed, capsys):
    loader = Loader(skewed, native_res=True, batch_patches=4096)
    assert loader.weights == pytest.approx({"coyo": 6 / 66, "dfn": 60 / 66})
    err = capsys.readouterr().err.strip().splitlines()
    mix = [line for line in err if "loader: mix: " in line]  # (the caption-mix notice may print beside it)
    assert len(mix) == 1 and "hqitp not in the manifest: dropped" in mix[0]


@pytest.mark.parametrize("native", [True, False])
def test_ranks_read_only_their_share_and_shares_rotate(skewed, native):
    kw = dict(native_res=True, batch_patches=4096) if native else dict(resolution=8, batch_size=16)
    ranks = [Loader(skewed, mix="dfn=0.9,coyo=0.1", seed=3, rank=r, world_size=2, **kw) for r in (0, 1)]
    assert sum(r.stats["rows_read"] for r in ranks) == 1000           # every row read once, by one rank
    for src in ("dfn", "coyo"):
        e0 = [set(map(tuple, r.share(src, 0).tolist())) for r in ranks]
        e1 = [set(map(tuple, r.share(src, 1).tolist())) for r in ranks]
        assert not e0[0] & e0[1] and e0[0] | e0[1] == e1[0] | e1[1]
    assert any(not np.array_equal(r.share("coyo", 0), r.share("coyo", e)) for r in ranks for e in (1, 2))
    # an epoch of each stream serves every sample at most once across the ranks
    seen = {}
    for _, x, y in zip(range(40), ranks[0], ranks[1]):
        assert x.area == y.area and x.sources[0] == y.sources[0]
        for b in (x, y):
            for k in b.keys:
                seen.setdefault((b.sources[0], b.source_epoch, k), 0)
                seen[(b.sources[0], b.source_epoch, k)] += 1
    assert max(seen.values()) == 1


def _keys_after(loader, steps):
    out = []
    for _, b in zip(range(steps), _chain(loader)):
        out.append((b.global_step, b.sources[0], b.source_epoch, b.area, tuple(b.keys)))
    return out


@pytest.mark.parametrize("w_from,w_to", [(2, 1), (1, 2)])
def test_resume_across_world_sizes_starts_each_source_s_next_epoch(skewed, w_from, w_to, capsys):
    kw = dict(mix="dfn=0.9,coyo=0.1", native_res=True, batch_patches=4096, seed=4)
    before = [Loader(skewed, rank=r, world_size=w_from, **kw) for r in range(w_from)]
    for ld in before:
        _keys_after(ld, 7)
    states = [json.loads(json.dumps(ld.state_dict())) for ld in before]
    epochs = states[0]["snapshot"]["epochs"]
    ref = Loader(skewed, rank=0, world_size=w_from, **kw)           # the uninterrupted run's areas / sources
    ref_steps = _keys_after(ref, 7 + 10)[7:]
    capsys.readouterr()
    after = [Loader(skewed, rank=r, world_size=w_to, **kw) for r in range(w_to)]
    for ld in after:
        ld.load_state_dict(states[0])                               # a new rank takes rank 0's state
    assert "every source starts its next epoch" in capsys.readouterr().err
    got = [_keys_after(ld, 10) for ld in after]
    for steps in got:
        # the global step, area and source sequence continue exactly
        assert [(s, src, a) for s, src, _, a, _ in steps] == [(s, src, a) for s, src, _, a, _ in ref_steps]
        for _, src, e, _, _ in steps:
            assert e >= epochs[src] + 1                              # the bound: a fresh epoch, no repeat in it
    keys = [(src, e, k) for steps in got for _, src, e, _, ks in steps for k in ks]
    assert len(keys) == len(set(keys))


def test_same_world_size_resume_is_exact_across_segments(skewed):
    kw = dict(mix="dfn=0.5,coyo=0.5", native_res=True, batch_patches=4096, seed=6, rank=1, world_size=2)
    full = Loader(skewed, **kw)
    ref = [b for _, b in zip(range(30), _chain(full))]
    first = Loader(skewed, **kw)
    got = [b for _, b in zip(range(13), _chain(first))]
    state = json.loads(json.dumps(first.state_dict()))
    again = Loader(skewed, **kw)
    again.load_state_dict(state)
    got += [b for _, b in zip(range(17), _chain(again))]
    for x, y in zip(got, ref):
        assert x.keys == y.keys and x.global_step == y.global_step and torch.equal(x.images, y.images)
    assert len(got) == 30


def _chain(loader):
    while True:
        yield from loader


def test_bad_input_is_a_one_line_error(skewed, tmp_path):
    kw = dict(native_res=True, batch_patches=4096)
    for mix, msg in (("dfn=1,yfcc=1", "source 'yfcc'.*does not have"), ("dfn=-0.5,coyo=1", "negative"),
                     ("dfn=0,coyo=0", "all weights are zero")):
        with pytest.raises(ValueError, match=msg) as e:
            Loader(skewed, mix=mix, **kw)
        assert "\n" not in str(e.value)
    # fewer row groups than ranks: row ranges of them are dealt (tests/test_loader_shares.py), not refused
    assert Loader(skewed, mix="dfn=1", rank=0, world_size=16, **kw).share_info()["dfn"]["spans"]
    # a share whose buckets are all smaller than one batch: batches cycle through a bucket, with a notice
    tiny = Loader(skewed, mix="dfn=1", native_res=True, batch_patches=2**20, rank=0, world_size=2)
    b = next(iter(tiny))
    assert len(b) * b.area == 2**20 and len(set(b.keys)) <= 50


def test_footers_are_summarised_and_dropped(skewed, tmp_path):
    """Start-up memory: no parsed footer outlives the footer pass (without waiting for the cyclic GC), and a
    nested column before `source` does not hide the source statistics."""
    import gc
    import shutil

    import polars as pl

    from aimv2data.loader.samples import Manifest

    gc.collect()
    gc.disable()
    try:
        m = Manifest(skewed)
        alive = [o for o in gc.get_objects() if type(o).__name__ in ("FileMetaData", "ParquetSchema")]
    finally:
        gc.enable()
    assert not alive
    moved = tmp_path / "manifest"
    shutil.copytree(skewed, moved)
    for f in sorted((moved / "samples").glob("*.parquet")):
        df = pl.read_parquet(f)
        df.select("syn_demo", *[c for c in df.columns if c != "syn_demo"]).write_parquet(f)
    m2 = Manifest(moved)
    assert m2.chunk_source == m.chunk_source and m2.sources == m.sources == {"coyo": "coyo", "dfn": "dfn"}


def test_reading_a_share_leaves_arrows_default_memory_pool_as_it_was(skewed):
    import pyarrow as pa

    before = pa.default_memory_pool().backend_name
    loader = Loader(skewed, native_res=True, batch_patches=4096, rank=0, world_size=2)
    if loader._next is not None:   # the next segment's share, read in a thread: its read restores the pool too
        assert loader._next.ready(timeout=120)
    assert pa.default_memory_pool().backend_name == before
    loader.close()
