"""`aimv2 split`: a deterministic hash-of-key train/val split into two valid manifests."""
import json
import sys
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from aimv2data.loader import Loader, SampleTable  # noqa: E402
from aimv2data.manifest.split import key_fraction, split_manifest  # noqa: E402
from cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("split_data"))


def keys(m):
    return set(pl.read_parquet(Path(m) / "samples/*.parquet")["key"].to_list())


def test_split_is_disjoint_complete_deterministic_and_loadable(data, tmp_path):
    manifest, _ = data
    r = CliRunner().invoke(main, ["split", str(manifest), "--val-fraction", "0.2", "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    train, val = keys(tmp_path / "a/train"), keys(tmp_path / "a/val")
    assert not train & val and train | val == keys(manifest)
    assert 6 <= len(val) <= 30  # 20% of 80, by hash
    assert all(key_fraction(k) < 0.2 for k in val) and all(key_fraction(k) >= 0.2 for k in train)
    split_manifest(manifest, tmp_path / "b", 0.2)  # a rerun elsewhere: the same halves
    assert keys(tmp_path / "b/val") == val
    for side, n in (("train", len(train)), ("val", len(val))):
        meta = json.loads((tmp_path / "a" / side / "_manifest.json").read_text())
        assert meta["counts"]["samples"] == n and sum(meta["counts"]["per_bucket"].values()) == n
        assert meta["split"]["side"] == side
        t = SampleTable(tmp_path / "a" / side)  # the loader reads it, bytes included
        assert t.n == n
    batch = next(iter(Loader(tmp_path / "a/val", resolution=56, batch_size=4, workers=0)))
    assert batch.images.shape == (4, 3, 56, 56) and set(batch.keys) <= val


def test_split_refuses_bad_fraction_and_overwriting_the_source(data, tmp_path):
    manifest, _ = data
    r = CliRunner().invoke(main, ["split", str(manifest), "--val-fraction", "1.5", "-o", str(tmp_path)])
    assert r.exit_code != 0 and "--val-fraction must be in (0, 1)" in r.output
    with pytest.raises(ValueError, match="overwrite the source"):
        split_manifest(manifest, manifest, 0.1)
