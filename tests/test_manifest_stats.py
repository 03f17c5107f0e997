"""`aimv2 stats`: the numbers add up to the manifest, and the plots are real PNGs."""
import json
import os
import sys

import polars as pl
from click.testing import CliRunner

from aimv2data.manifest.build import build_manifest
from aimv2data.manifest.captions import attach
from aimv2data.manifest.stats import compute_stats, plot_stats

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402


def make(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    F.write_img2dataset_tar(shards / "00000.tar", F.catalogue())
    F.good_tar(shards / "00001.tar", 10, start=100, source="coyo")
    m = tmp_path / "m"
    build_manifest([str(shards)], m, progress=False, idx="none")
    pl.DataFrame({"uid": ["g100", "g101", "g101"], "c": ["one two three", "four five", "six"]}).write_parquet(
        tmp_path / "set.parquet")
    attach(m, tmp_path / "set.parquet", on="uid", column="c", name="syn")
    return m


def test_numbers_add_up(tmp_path):
    m = make(tmp_path)
    s = compute_stats(m)
    kept = [c for c in F.catalogue() if c.expect == "keep"]
    rejected = [c for c in F.catalogue() if c.expect != "keep"]
    assert s["samples"] == len(kept) + 10 and s["rejects"] == len(rejected)
    assert s["per_source"] == {"hostile": len(kept), "coyo": 10}
    assert sum(b["samples"] for b in s["per_bucket"]) == s["samples"] and len(s["per_bucket"]) == 33
    assert s["per_reason"]["truncated"] == 4 and s["per_reason"]["decompression_bomb"] == 2
    assert sum(s["aspect_hist"]["counts"]) == s["samples"]
    assert s["rotated_by_exif"] == 4 + 2                       # exif_5..8, exif6_png, exif6_webp
    # Alt-text: every kept sample but the blank one has a caption.
    assert s["captions"]["caption"]["samples"] == s["samples"] - 1
    syn = s["captions"]["syn_syn"]
    assert syn["samples"] == 2 and syn["captions_per_sample"] == 1.5
    assert syn["words"]["p50"] == 2.0                          # lengths 3, 2, 1 words
    sizes = pl.read_parquet(m / "samples/*.parquet")["width"]
    assert s["size"]["width"]["p50"] == float(sizes.median())


def test_plots_and_cli(tmp_path):
    from cli.main import main

    m = make(tmp_path)
    files = plot_stats(compute_stats(m), tmp_path / "plots")
    assert sorted(f.name for f in files) == ["aspects.png", "buckets.png", "captions.png", "sizes.png"]
    for f in files:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    res = CliRunner().invoke(main, ["stats", str(m), "--json"])
    assert res.exit_code == 0, res.output
    kept = sum(c.expect == "keep" for c in F.catalogue())
    assert json.loads(res.output)["per_source"] == {"hostile": kept, "coyo": 10}
    res = CliRunner().invoke(main, ["stats", str(m), "--plot", str(tmp_path / "p2")])
    assert res.exit_code == 0, res.output
    assert "per bucket" in res.output and "syn_syn" in res.output and (tmp_path / "p2/buckets.png").is_file()
    res = CliRunner().invoke(main, ["stats", str(tmp_path)])
    assert res.exit_code == 1 and "aimv2 shard" in res.output
