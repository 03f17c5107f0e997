"""The bucket table: every grid fits its area, the crop it costs is small, assignment is nearest in log
aspect, and _manifest.json carries the whole table."""
import bisect
import json
import math

import numpy as np
import pytest

from aimv2data.buckets import AREAS, DEFAULT, best_grid, crop_fraction, make_table, table_from_manifest


def worst_crop(table, bucket, area, n=201):
    lo, hi = table.interval(bucket)
    g = table.grid(bucket, area)
    return max(crop_fraction(r, g) for r in np.exp(np.linspace(math.log(lo), math.log(hi), n)))


def test_default_table_is_33_log_spaced_aspects_with_exact_square():
    a = np.array(DEFAULT.aspects)
    assert len(a) == 33 and a[16] == 1.0 and a[0] == pytest.approx(0.25) and a[-1] == pytest.approx(4.0)
    assert np.allclose(np.diff(np.log2(a)), 1 / 8)          # eight buckets per doubling of w/h


@pytest.mark.parametrize("area", AREAS)
def test_every_grid_fits_and_crops_little(area):
    crops = [worst_crop(DEFAULT, b, area) for b in range(len(DEFAULT))]
    fills = [np.prod(DEFAULT.grid(b, area)) / area for b in range(len(DEFAULT))]
    assert all(f <= 1 for f in fills)                        # h*w <= A, always
    assert min(fills) >= 0.75 and np.mean(fills) >= 0.9      # little of the patch budget unused
    # Worst case over every image aspect the bucket takes (within 1:4..4:1): measured 8.6% at A=128,
    # 8.2% / 7.3% at 256 / 512, <= 6% from 1024, 4.9% at 4096 (docs/shard.md).
    assert max(crops) <= 0.09
    if area >= 1024:
        assert max(crops) <= 0.06
    if area == 4096:
        assert max(crops) <= 0.05


def test_more_buckets_crop_less_at_high_area():
    coarse, fine = make_table(9), make_table(33)
    worst = lambda t: max(worst_crop(t, b, 4096) for b in range(len(t)))  # noqa: E731
    assert worst(fine) < worst(coarse) / 2


def test_assignment_is_nearest_aspect_in_log_space():
    rng = np.random.default_rng(0)
    w = rng.integers(1, 5000, 2000)
    h = rng.integers(1, 5000, 2000)
    got = DEFAULT.assign(w, h)
    want = np.abs(np.log(w / h)[:, None] - np.log(np.array(DEFAULT.aspects))[None]).argmin(1)
    assert (got == want).all()
    assert got.dtype == np.int16
    assert [DEFAULT.bucket_of(x, y) for x, y in zip(w[:50], h[:50])] == got[:50].tolist()
    assert DEFAULT.bucket_of(640, 640) == 16
    assert DEFAULT.bucket_of(10000, 100) == 32 and DEFAULT.bucket_of(100, 10000) == 0   # beyond 4:1 -> ends


def test_manifest_json_carries_the_whole_table():
    js = json.loads(json.dumps(DEFAULT.to_json()))           # plain JSON, no numpy types
    assert [b["id"] for b in js] == list(range(33))
    assert js[0]["lo"] is None and js[-1]["hi"] is None
    his = [b["hi"] for b in js[:-1]]
    assert his == sorted(his) and all(b["lo"] == pytest.approx(p["hi"]) for p, b in zip(js, js[1:]))
    for b in js:
        for a in AREAS:
            assert tuple(b["grids"][str(a)]) == DEFAULT.grid(b["id"], a)
    # A reader that has only the json assigns like bucket_of does.
    edges = [b["hi"] for b in js[:-1]]
    rng = np.random.default_rng(1)
    pairs = [(400, 300), (300, 400), (1920, 1080), (1000, 999), (50, 400)] + rng.integers(1, 9000, (3000, 2)).tolist()
    for w, h in pairs:
        assert bisect.bisect_right(edges, w / h) == DEFAULT.bucket_of(w, h)
    t = table_from_manifest({"bucket_spec": DEFAULT.spec()})
    assert t == DEFAULT


def test_grid_for_any_area_and_square_bucket():
    assert DEFAULT.grid(16, 1024) == (32, 32) and DEFAULT.grid(16, 4096) == (64, 64)
    for area in (1, 7, 300, 1500, 3000):
        for b in (0, 8, 16, 24, 32):
            h, w = DEFAULT.grid(b, area)
            assert h >= 1 and w >= 1 and h * w <= area
    assert best_grid(1.0, 1.0, 1) == (1, 1)


def test_bad_tables_are_refused():
    with pytest.raises(ValueError):
        make_table(1)
    with pytest.raises(ValueError):
        make_table(33, 0.5)
    with pytest.raises(ValueError):
        DEFAULT.grid(33, 128)
