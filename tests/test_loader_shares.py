"""Shares (issue 21 point 5): every row in exactly one rank's share per epoch, whatever the row groups and
ranks, including a source with fewer row groups than ranks (a curated source on many GPUs); validation
counts its rows from the parquet footers."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _loader_fixtures import build_manifest  # noqa: E402

from aimv2data.loader import Loader  # noqa: E402
from aimv2data.loader.samples import SampleTable  # noqa: E402
from aimv2data.loader.shares import deal_spans  # noqa: E402

torch.set_num_threads(1)
P = 14


def _rows_of(spans, rows):
    """Global row ids (chunk, row) a rank's spans cover; each span inside its chunk."""
    out = []
    for c, a, b in spans.tolist():
        assert 0 <= a < b <= rows[c]
        out += [(c, i) for i in range(a, b)]
    return out


def test_every_row_is_in_exactly_one_share():
    rng = np.random.default_rng(0)
    for case in range(300):
        chunks = int(rng.integers(1, 12))
        rows = rng.integers(1, 40, chunks)
        keys = rng.integers(0, 2**62, chunks)
        world = int(rng.integers(1, 70))
        epoch = int(rng.integers(0, 5))
        shares = deal_spans(keys, rows, 3, 11, epoch, world)
        assert len(shares) == world
        got = [r for sp in shares for r in _rows_of(sp, rows)]
        assert sorted(got) == [(c, i) for c in range(chunks) for i in range(rows[c])], case
        sizes = [int((sp[:, 2] - sp[:, 1]).sum()) for sp in shares]
        if chunks >= world:     # whole row groups, as before: cheap to read
            assert all((sp[:, 1] == 0).all() and (sp[:, 2] == rows[sp[:, 0]]).all() for sp in shares)
            assert max(sizes) - min(sizes) <= rows.max()
        else:                   # runs of rows: balanced to within one row
            assert max(sizes) - min(sizes) <= 1
        again = deal_spans(keys, rows, 3, 11, epoch, world)     # every rank computes the same deal
        assert all(np.array_equal(a, b) for a, b in zip(shares, again))


def test_split_shares_change_from_epoch_to_epoch():
    rows, keys = np.array([1000]), np.array([12345])
    e0, e1 = deal_spans(keys, rows, 0, 5, 0, 8), deal_spans(keys, rows, 0, 5, 1, 8)
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))


@pytest.fixture(scope="module")
def one_group(tmp_path_factory):
    """One source, one parquet file, one row group (what `aimv2 shard` writes for one tar)."""
    m = build_manifest(tmp_path_factory.mktemp("one"), n=60, seed=4, shards=1, patch_size=P, aspects=[1.0],
                       sources=("hqitp",))
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(f).num_row_groups for f in (m / "samples").glob("*.parquet")) == 1
    return m


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_one_row_group_source_trains_on_several_ranks(one_group, world):
    ranks = [Loader(one_group, native_res=False, resolution=28, batch_size=4, seed=2, rank=r, world_size=world)
             for r in range(world)]
    keys = [[t.key(i) for i in range(t.n)] for t in (x.maker.tables["hqitp"] for x in ranks)]
    every = [k for share in keys for k in share]
    assert len(every) == len(set(every)) == 60                  # each row in exactly one rank's share
    assert max(map(len, keys)) - min(map(len, keys)) <= 1
    for x, mine in zip(ranks, keys):
        b = next(iter(x))
        assert len(b) == 4 and set(b.keys) <= set(mine)         # a rank's batches come from its share
        assert x.state_dict()["share"]["hqitp"]["spans"]         # the state says which rows it read


def test_validation_counts_rows_from_the_footers(tmp_path, monkeypatch):
    """The fixed-resolution Validator sizes its batch from the row count: the footers have it, so a rank
    reads only its own share, not the whole table first."""
    import aimv2train.train.validate as validate
    from aimv2train.train.distributed import DistInfo

    manifest = build_manifest(tmp_path, n=80, seed=5, shards=2, patch_size=P, aspects=[1.0], parts=4)
    read = []
    real = SampleTable.__init__

    def counting(self, *a, **k):
        real(self, *a, **k)
        read.append(self.n)

    monkeypatch.setattr(SampleTable, "__init__", counting)
    monkeypatch.setattr(validate, "min_over_ranks", lambda n, info, device: n)   # no process group here

    class Tok:
        pad_id = 0

        def __call__(self, text):
            return [1, 2, 3]

    v = validate.Validator(str(manifest), Tok(), DistInfo(rank=0, world_size=4), torch.device("cpu"),
                           native_res=False, resolution=28, batch_size=64, batch_patches=4096)
    assert sum(read) < 80 and sum(read) == v.loader.stats["rows_read"]     # its share only
    assert v.loader.sampler.b == 80 // 4                                    # the batch from the footer count
