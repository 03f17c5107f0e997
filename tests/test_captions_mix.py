"""`--caption-mix` (issue 20 point 14): Table 2 by default, a notice when an attached caption set is never
drawn (COYO after `caption attach --name recap`), per-source per-set weights, and the realised caption-set
shares in metrics.jsonl and the summary."""
from __future__ import annotations

import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402
from _loader_fixtures import build_manifest  # noqa: E402

from aimv2data.loader import Loader  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """dfn / coyo / hqitp rows (every 7th without alt-text), syn_demo on dfn and hqitp, and a set `recap`
    attached to every row, COYO's included."""
    man = build_manifest(tmp_path_factory.mktemp("capmix"), n=240, seed=2, shards=2, patch_size=16)
    for f in sorted((man / "samples").glob("*.parquet")):
        df = pl.read_parquet(f)
        recap = pl.Series("syn_recap", [[f"recap {k}"] for k in df["key"]], dtype=pl.List(pl.String))
        df.with_columns(recap).write_parquet(f)
    return man


def _draws(loader, epochs: int = 2) -> list[tuple[str, str, str]]:
    """(source, caption set, caption) of every sample drawn."""
    out = []
    for _ in range(epochs):
        for b in loader:
            assert len(b.caption_sets) == len(b)
            out += list(zip(b.sources, b.caption_sets, b.captions))
    return out


def test_default_keeps_table2_and_says_coyo_never_gets_the_attached_set(manifest, capsys):
    loader = Loader(manifest, mix="rows", resolution=32, batch_size=40, seed=0)
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "caption mix" in ln)
    assert "probability 0" in line and "coyo: recap" in line and "--caption-mix" in line
    assert "dfn: recap" not in line
    draws = _draws(loader)
    coyo = [k for s, k, _ in draws if s == "coyo"]
    assert coyo and set(coyo) <= {"alt", "syn_recap"} and coyo.count("alt") / len(coyo) > 0.8  # recap: no alt only
    dfn = [k for s, k, _ in draws if s == "dfn"]
    assert 0.35 < dfn.count("alt") / len(dfn) < 0.65 and "syn_recap" in dfn and "syn_demo" in dfn
    counts = loader.stats["captions"]
    assert sum(sum(v.values()) for v in counts.values()) == len(draws) and counts["coyo"]["alt"] == coyo.count("alt")


def test_caption_mix_weights_sets_per_source(manifest, capsys):
    loader = Loader(manifest, mix="rows", resolution=32, batch_size=40, seed=0,
                    caption_mix="coyo:alt=1,coyo:recap=1,dfn:syn_demo=1")
    err = capsys.readouterr().err
    assert "dfn: recap" in err and "coyo: recap" not in err   # dfn's row names syn_demo alone
    draws = _draws(loader)
    coyo = [k for s, k, _ in draws if s == "coyo"]
    assert 0.35 < coyo.count("syn_recap") / len(coyo) < 0.75
    assert all(c.startswith("recap ") for s, k, c in draws if s == "coyo" and k == "syn_recap")
    dfn = [k for s, k, _ in draws if s == "dfn"]
    assert set(dfn) == {"syn_demo"}                                    # its row replaced: syn_demo only
    hq = [k for s, k, _ in draws if s == "hqitp"]
    assert hq.count("alt") / len(hq) > 0.75                            # not named: Table 2 (28 : 3)


def test_the_notice_goes_when_every_set_has_weight(manifest, capsys):
    Loader(manifest, mix="rows", resolution=32, batch_size=40, caption_mix="coyo:alt=1,coyo:synthetic=1,"
           "dfn:alt=1,dfn:synthetic=1,hqitp:alt=1,hqitp:synthetic=1")
    assert "caption mix" not in capsys.readouterr().err


@pytest.mark.parametrize("text, match", [
    ("coyo:alt", "is not SOURCE:SET=WEIGHT"),
    ("coyo=0.5", "is not SOURCE:SET=WEIGHT"),
    ("coyo:alt=-1,coyo:recap=1", "must be >= 0"),
    ("laion:alt=1", "names source 'laion', which the manifest does not have"),
    ("coyo:rekap=1", "caption set 'rekap' is not attached.*recap"),
])
def test_bad_caption_mix_is_one_line(manifest, text, match):
    with pytest.raises(ValueError, match=match):
        Loader(manifest, mix="rows", resolution=32, batch_size=40, caption_mix=text)


def test_train_logs_caption_shares_and_takes_the_flag(tmp_path):
    from aimv2train.train.trainer import train
    from cli.main import main

    assert "--caption-mix" in CliRunner().invoke(main, ["train", "--help"]).output
    man, tok = _train_fixtures.build(tmp_path / "data")
    s = train(_train_fixtures.tiny_config(man, tok, tmp_path / "a", steps=3))
    recs = _train_fixtures.metrics(tmp_path / "a")
    shares = recs[-1]["caption_shares"]["demo"]
    assert set(shares) <= {"alt", "syn_demo", "none"} and sum(shares.values()) == pytest.approx(1.0)
    assert 0 < shares["alt"] < 1 and s["caption_shares"] == recs[-1]["caption_shares"]
    s = train(_train_fixtures.tiny_config(man, tok, tmp_path / "b", steps=2, caption_mix="demo:syn_demo=1"))
    assert s["caption_shares"]["demo"] == {"syn_demo": 1.0}
