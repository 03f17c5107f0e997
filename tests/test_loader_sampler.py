"""The sampler: what goes in each batch, as a pure function of (seed, epoch, step) and the manifest."""
import numpy as np
import pytest

from aimv2data.loader.sampler import (FixedSampler, NativeSampler, area_exponent, area_probabilities, unit)

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


def test_native_epoch_is_constant_budget_and_uses_every_row_once():
    members = _members([900, 2500, 400, 3000])
    s = NativeSampler(members, _grids(members), batch_patches=8192, seed=3)
    seen = []
    for step in range(s.steps(0)):
        sp = s.spec(0, step)
        assert sp.area in AREAS and len(sp.rows) * sp.area == 8192          # B * A = C exactly
        assert set(sp.rows) <= set(members[sp.bucket].tolist())            # one bucket per batch
        assert sp.area >= sp.drawn_area
        seen.extend(sp.rows.tolist())
    assert len(seen) == len(set(seen))                                     # no row twice in an epoch
    # The epoch ends only when no bucket can fill even A = 4096 (B = 2): leftovers < 2 per bucket.
    left = {b: len(m) for b, m in members.items()}
    for r in seen:
        left[next(b for b, m in members.items() if m[0] <= r <= m[-1])] -= 1
    assert all(0 <= v < 2 for v in left.values())


def test_tail_falls_back_to_larger_areas_only_when_the_drawn_one_cannot_be_filled():
    members = _members([300, 50])
    s = NativeSampler(members, _grids(members), batch_patches=4096, seed=0)
    plan = s.plan(0)
    counts = {b: len(m) for b, m in members.items()}
    left = dict(counts)
    for drawn, area, bucket, start, b in plan.tolist():
        assert b == 4096 // area
        if area != drawn:
            # no bucket could hold a batch of the drawn area
            assert all(v < 4096 // drawn for v in left.values())
        assert left[bucket] >= 4096 // area
        assert start == counts[bucket] - left[bucket]
        left[bucket] -= 4096 // area


def test_bucket_is_chosen_in_proportion_to_samples_left():
    # Step 0 of many epochs: the first bucket choice sees the full counts 1000 : 3000 : 6000.
    members = _members([1000, 3000, 6000])
    s = NativeSampler(members, _grids(members), batch_patches=4096, seed=11)
    from aimv2data.loader.sampler import BUCKET
    picks = []
    for epoch in range(4000):
        u = unit(11, epoch, 0, BUCKET)
        cum = np.cumsum([1000, 3000, 6000])
        picks.append(int(np.searchsorted(cum, u * cum[-1], side="right")))
    freq = np.bincount(picks, minlength=3) / len(picks)
    assert np.allclose(freq, [0.1, 0.3, 0.6], atol=0.03)
    # and the sampler's own plan makes exactly these choices
    for epoch in range(50):
        s._plan_epoch = None
        assert s.plan(epoch)[0, 2] == picks[epoch]


def test_native_is_deterministic_and_seed_and_epoch_dependent():
    members = _members([700, 1300])
    a = NativeSampler(members, _grids(members), 4096, seed=5)
    b = NativeSampler(members, _grids(members), 4096, seed=5)
    c = NativeSampler(members, _grids(members), 4096, seed=6)
    assert np.array_equal(a.plan(0), b.plan(0))
    assert all(np.array_equal(a.spec(0, i).rows, b.spec(0, i).rows) for i in range(a.steps(0)))
    assert not np.array_equal(a.plan(0), c.plan(0))
    p0 = a.plan(0).copy()
    assert not np.array_equal(p0, a.plan(1))


def test_native_ranks_agree_on_area_and_bucket_and_split_rows():
    members = _members([1500, 2600, 800])
    world = 4
    ranks = [NativeSampler(members, _grids(members), 4096, seed=1, rank=r, world_size=world) for r in range(world)]
    steps = ranks[0].steps(0)
    assert all(r.steps(0) == steps for r in ranks)
    allrows = []
    for i in range(steps):
        specs = [r.spec(0, i) for r in ranks]
        assert len({(s.area, s.bucket, s.grid) for s in specs}) == 1
        for s in specs:
            assert len(s.rows) == 4096 // s.area                      # C is per rank
            allrows.extend(s.rows.tolist())
    assert len(allrows) == len(set(allrows))


def test_grid_batch_rule_fills_the_budget_to_within_one_image():
    members = _members([3000, 2000])
    grids = {0: {a: (int(0.9 * a**0.5), int(0.9 * a**0.5)) for a in AREAS},     # grids well under A
             1: {a: (1, a) for a in AREAS}}
    s = NativeSampler(members, grids, 8192, seed=0, batch_rule="grid")
    area_rule = NativeSampler(members, grids, 8192, seed=0)
    assert s.max_batch > area_rule.max_batch == 8192 // 128
    seen = []
    for i in range(s.steps(0)):
        sp = s.spec(0, i)
        h, w = sp.grid
        assert len(sp.rows) == 8192 // (h * w)
        assert 8192 - h * w < len(sp.rows) * h * w <= 8192
        seen += sp.rows.tolist()
    assert len(seen) == len(set(seen))
    with pytest.raises(ValueError, match="batch_rule"):
        NativeSampler(members, grids, 8192, batch_rule="pack")


def test_batch_patches_must_be_a_power_of_two_of_at_least_4096():
    members = _members([100])
    for bad in (1000, 2048, 6144):
        with pytest.raises(ValueError, match="power of two"):
            NativeSampler(members, _grids(members), bad)


def test_fixed_sampler_partitions_each_epoch_across_ranks():
    n = 1003
    bucket_of = np.arange(n) % 3
    members = {b: np.flatnonzero(bucket_of == b) for b in range(3)}
    world, bs = 3, 16
    ranks = [FixedSampler(n, bucket_of, members, 224, 14, bs, seed=2, rank=r, world_size=world)
             for r in range(world)]
    assert ranks[0].steps(0) == n // (bs * world) == 20
    rows = [r for s in ranks for i in range(s.steps(0)) for r in s.spec(0, i).rows.tolist()]
    assert len(rows) == len(set(rows)) == 20 * bs * world
    assert ranks[0].spec(0, 0).grid == (16, 16)
    e0 = ranks[0].spec(0, 0).rows
    assert not np.array_equal(e0, ranks[0].spec(1, 0).rows)           # a new permutation each epoch
    # a replacement stays in the failed sample's bucket
    sp = ranks[0].spec(0, 4)
    for slot in range(bs):
        assert bucket_of[ranks[0].replacement(sp, slot, 1)] == bucket_of[sp.rows[slot]]


def test_fixed_sampler_rejects_a_resolution_off_the_patch_grid():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        FixedSampler(100, np.zeros(100, int), {0: np.arange(100)}, 230, 14, 8)
