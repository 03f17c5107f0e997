"""`aimv2 fetch --retry-failed`: transient failures (503, time-outs) are downloaded again into new shards of
the same output, exactly once; permanent ones (404) are left alone; a round with nothing to do changes
nothing; shard afterwards sees every sample once."""
from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from _fetch_fixtures import snapshot, tar_keys
from aimv2data.serve import LoopbackServer, small_jpeg
from cli.main import main

FAST = ["--processes", "1", "--download-threads", "4", "--timeout", "2"]
GOOD, FLAKY_503, FLAKY_STALL, GONE = 10, 3, 2, 3


def run(*args):  # the loopback server is a private address
    return CliRunner().invoke(main, ["fetch", "--allow-private-addresses", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    root = tmp_path_factory.mktemp("retry")
    routes = {f"/img/{i}.jpg": small_jpeg(i) for i in range(GOOD + FLAKY_503 + FLAKY_STALL)}
    flaky = {f"/img/{GOOD + i}.jpg": [503] for i in range(FLAKY_503)}
    flaky.update({f"/img/{GOOD + FLAKY_503 + i}.jpg": ["stall"] for i in range(FLAKY_STALL)})
    with LoopbackServer(routes=routes, flaky=flaky, slow_s=4, hostile=False) as srv:
        urls = [srv.url(p) for p in routes] + [srv.url(f"/gone/{i}.jpg") for i in range(GONE)]
        lst = root / "list.parquet"
        pl.DataFrame({"url": urls, "caption": [f"c{i}" for i in range(len(urls))]}).write_parquet(lst)
        yield srv, root, lst


@pytest.mark.slow
def test_retry_recovers_transient_failures_once_and_leaves_permanent_ones(flaky, tmp_path):
    srv, root, lst = flaky
    out = tmp_path / "out"
    flags = ["--source", "parquet", "--url-list", lst, "--output", out, "--shard-size", 8, *FAST]
    res = run(*flags)
    assert res.exit_code == 0, res.output
    first = json.loads((out / "fetch_summary.json").read_text())
    assert first["samples"]["success"] == GOOD
    reasons = first["failures_by_reason"]
    assert reasons.get("http_503") == FLAKY_503 and reasons.get("http_404") == GONE
    assert reasons.get("timeout", 0) + reasons.get("connection_error", 0) == FLAKY_STALL
    tars_before = sorted(p.name for p in out.glob("*.tar"))

    res = run(*flags, "--retry-failed")                        # the original command, flag added
    assert res.exit_code == 0, res.output
    s = json.loads((out / "fetch_summary.json").read_text())
    r = s["retries"]
    assert r["rounds"][0]["to_retry"] == FLAKY_503 + FLAKY_STALL
    assert r["rounds"][0]["recovered"] == FLAKY_503 + FLAKY_STALL
    assert r["success_after_retries"] == GOOD + FLAKY_503 + FLAKY_STALL
    assert r["failures_by_reason_after_retries"] == {"http_404": GONE}
    new_tars = sorted(p.name for p in out.glob("*.tar") if p.name not in tars_before)
    assert new_tars and all(int(t[:5]) > int(tars_before[-1][:5]) for t in new_tars)   # new shards, after the old
    for i in range(GONE):
        assert srv.hits[f"/gone/{i}.jpg"] == 1                  # a 404 is never asked again

    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == GOOD + FLAKY_503 + FLAKY_STALL   # every image once
    captions = set()
    import tarfile
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tf:
            captions |= {tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")}
    assert captions == {f"c{i}" for i in range(GOOD + FLAKY_503 + FLAKY_STALL)}

    before = snapshot(out)                                       # nothing left: a second retry changes nothing
    res = run("--retry-failed", "--output", out)
    assert res.exit_code == 0, res.output
    assert "nothing left to retry" in res.output
    assert snapshot(out) == before

    from aimv2data.manifest.build import build_manifest
    rep = build_manifest([str(out)], tmp_path / "manifest", progress=False)
    assert rep["merged"] and rep["samples"] == GOOD + FLAKY_503 + FLAKY_STALL
    df = pl.read_parquet(tmp_path / "manifest" / "samples" / "*.parquet")
    assert df["caption"].n_unique() == df.height == GOOD + FLAKY_503 + FLAKY_STALL


def test_retry_failed_on_a_directory_that_is_not_a_fetch_output(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    res = run("--retry-failed", "--output", tmp_path / "x")
    assert res.exit_code != 0
    assert "is not an aimv2 fetch output" in res.output and "--retry-failed" in res.output
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["notes.txt"]


def test_fetch_without_source_or_list_says_what_is_needed(tmp_path):
    res = run("--output", tmp_path / "y")
    assert res.exit_code != 0 and "--source and --url-list are required" in res.output
