"""The sampler: areas, the deal of chunks to ranks, the source mixture and segment plans, as pure
functions of the seed, the step and the manifest's chunk table."""
import numpy as np
import pytest

from aimv2data.loader.sampler import (Sampler, Snapshot, area_exponent, area_probabilities, choose_stream,
                                      parse_mix, resolve_mix, unit)
from aimv2data.loader.shares import deal

AREAS = [2**n for n in range(7, 13)]


def _members(sizes, seed=0):
    """Bucket id -> manifest rows, rows numbered consecutively across buckets."""
    out, start = {}, 0
    for b, n in enumerate(sizes):
        out[b] = np.arange(start, start + n)
        start += n
    return out


def _grids(buckets):
    # A square-ish grid per area; the sampler only passes it through.
    return {b: {a: (int(a**0.5), a // int(a**0.5)) for a in AREAS} for b in buckets}


def test_area_draw_follows_the_truncated_normal_mapped_to_7_12():
    # Exact probabilities from the inverse-CDF construction: a uniform grid of u hits each n in
    # proportion to the truncated normal's mass on n's rounding interval.
    us = (np.arange(20000) + 0.5) / 20000
    ns = np.array([area_exponent(u) for u in us])
    assert set(ns) == set(range(7, 13))
    probs = area_probabilities()
    for n in range(7, 13):
        assert abs((ns == n).mean() - probs[2**n]) < 1e-3
    # Symmetric around n = 9.5 and peaked in the middle, like N(0,1) on [-1, 1].
    assert probs[512] == pytest.approx(probs[1024]) and probs[128] == pytest.approx(probs[4096])
    assert probs[512] > probs[256] > probs[128]
    assert sum(probs.values()) == pytest.approx(1.0)


def test_unit_is_a_pure_uniform():
    assert unit(1, 2, 3) == unit(1, 2, 3)
    assert unit(1, 2, 3) != unit(1, 2, 4) != unit(2, 2, 3)
    u = np.array([unit(7, i) for i in range(20000)])
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.1).mean() - 0.1) < 0.01


def _counts(sizes):
    return {b: n for b, n in enumerate(sizes)}


def test_native_segment_is_constant_budget_one_bucket_and_rows_once():
    members = _members([900, 2500, 400, 3000])
    s = Sampler({"*": 1.0}, native=True, batch_patches=8192, grids=_grids(members), seed=3)
    plan, roll = s.plan(Snapshot(epochs={"*": 0}), {"*": _counts([900, 2500, 400, 3000])})
    assert roll == "*" and len(plan) > 50
    used = {b: 0 for b in members}
    for area, si, bucket, start, b in plan.tolist():
        assert area in AREAS and b * area == 8192 and si == 0      # B * A = C exactly
        assert start == used[bucket]                                 # the next B of the bucket's order
        used[bucket] += b
    assert all(used[b] <= len(members[b]) for b in members)
    # the epoch ends at the first step whose area no bucket can fill: leftovers < C/128 per bucket
    t_end = s.area(len(plan))
    assert all(len(members[b]) - used[b] < 8192 // t_end for b in members)
    order = s.order("*", 0, 1, members[1])
    assert sorted(order.tolist()) == members[1].tolist() and not np.array_equal(order, members[1])


def test_area_is_the_same_on_every_rank_and_world_size():
    grids = _grids([0])
    a = [Sampler({"*": 1.0}, native=True, batch_patches=4096, grids=grids, seed=7, rank=r, world_size=w)
         for r, w in ((0, 1), (0, 2), (1, 2), (5, 64))]
    for t in range(200):
        assert len({x.area(t) for x in a}) == 1


def test_deal_partitions_balances_and_rotates():
    rng = np.random.default_rng(0)
    rows = rng.integers(50, 150, 400)
    keys = rng.integers(0, 2**62, 400)
    for world in (1, 3, 8, 64):
        r0 = deal(keys, rows, 0, 11, 0, world)
        assert set(r0.tolist()) == set(range(world))                 # every chunk to exactly one rank
        loads = np.bincount(r0, weights=rows, minlength=world)
        assert loads.max() - loads.min() <= rows.max()               # balanced to within one chunk
        assert np.array_equal(r0, deal(keys, rows, 0, 11, 0, world))  # every rank computes the same deal
    e0, e1 = deal(keys, rows, 0, 11, 0, 8), deal(keys, rows, 0, 11, 1, 8)
    assert (e0 == e1).mean() < 0.3                                   # shares rotate across epochs
    assert not np.array_equal(e0, deal(keys, rows, 0, 12, 0, 8))     # and differ per source stream


def test_choose_stream_tracks_the_mix_within_one_batch():
    w = {"coyo": 0.1, "dfn": 0.9}
    served = {"coyo": 0, "dfn": 0}
    rng = np.random.default_rng(1)
    for _t in range(10_000):
        s = choose_stream(w, served)
        served[s] += int(rng.choice([1, 2, 4, 8, 16, 32]))
        total = sum(served.values())
        assert all(abs(served[k] - w[k] * total) <= 2 * 32 for k in w)


def test_parse_and_resolve_mix():
    assert parse_mix("dfn=0.60,coyo=0.06,hqitp=0.31") == {"dfn": 0.6, "coyo": 0.06, "hqitp": 0.31}
    assert parse_mix(None) is None and parse_mix("rows") == "rows"
    for bad, msg in (("dfn=-1", "negative"), ("dfn=0,coyo=0", "all weights are zero"), ("dfn", "NAME=WEIGHT")):
        with pytest.raises(ValueError, match=msg):
            parse_mix(bad)
    srcs = {"dfn": "DFN", "coyo": "coyo", "laion": "laion"}
    w, notes = resolve_mix(None, srcs)                               # Table 2 over the sources present
    assert w == pytest.approx({"coyo": 6 / 66, "dfn": 60 / 66})
    assert "hqitp not in the manifest" in notes[0] and "laion" in notes[1]
    with pytest.raises(ValueError, match="source 'yfcc'.*does not have"):
        resolve_mix("dfn=1,yfcc=1", srcs)
    assert resolve_mix(None, {"demo": "demo"})[0] == {"*": 1.0}      # none of Table 2's: by rows
    assert resolve_mix("DFN=3,coyo=1", srcs)[0] == pytest.approx({"coyo": 0.25, "dfn": 0.75})
    # the paper's mix as written runs on a manifest without HQITP: that source is dropped, with a notice
    w, notes = resolve_mix("dfn=0.60,coyo=0.06,hqitp=0.31", srcs)
    assert w == pytest.approx({"coyo": 6 / 66, "dfn": 60 / 66})
    assert "hqitp not in the manifest: dropped" in notes[0]
    with pytest.raises(ValueError, match="none of its sources"):
        resolve_mix("hqitp=1,dfn=0", srcs)


def test_batch_patches_must_be_a_power_of_two_of_at_least_4096():
    for c in (2048, 5000, 65535):
        with pytest.raises(ValueError, match="power of two"):
            Sampler({"*": 1.0}, native=True, batch_patches=c, grids=_grids([0]))
    with pytest.raises(ValueError, match="outside world size"):
        Sampler({"*": 1.0}, native=True, batch_patches=4096, grids=_grids([0]), rank=2, world_size=2)


def test_grid_batch_rule_fills_the_budget_to_within_one_image():
    grids = {0: {a: (int(a**0.5), int(0.8 * a) // int(a**0.5)) for a in AREAS}}
    s = Sampler({"*": 1.0}, native=True, batch_patches=65536, grids=grids, batch_rule="grid", seed=0)
    plan, _ = s.plan(Snapshot(epochs={"*": 0}), {"*": {0: 100_000}})
    for area, _, _b, _, n in plan.tolist():
        h, w = grids[0][area]
        assert 65536 - h * w < n * h * w <= 65536
