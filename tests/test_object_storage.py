"""The data path on object storage, against a real S3-protocol server on loopback (moto's standalone
server, started and stopped here). The code under test is the production path: fsspec/s3fs with the
endpoint from AWS_ENDPOINT_URL. fetch -> s3://, shard s3:// -> s3://, bench loader and a few training
steps reading from it give the same samples, batches and losses as the same pipeline on local disk."""
from __future__ import annotations

import json
import os

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from _s3_fixtures import S3_ENV, clear_fs_cache, free_port, s3_server
from aimv2data import storage
from cli.main import main

torch.set_num_threads(1)


def cli(*args):
    return CliRunner().invoke(main, [*map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def s3():
    with s3_server(buckets=("data",)) as endpoint:
        yield endpoint


# -- the reader -----------------------------------------------------------------------------------

def test_reader_coalesces_retries_and_caches(s3, tmp_path):
    import fsspec

    from aimv2data.loader.reader import ShardReader, coalesce

    blob = bytes(range(256)) * 64
    fsspec.filesystem("s3").pipe_file("data/r/blob.tar", blob)
    (tmp_path / "blob.tar").write_bytes(blob)
    reqs = [(0, 10, 5), (0, 100, 20), (0, 9000, 10)]
    assert [r[3] for r in coalesce(reqs, gap=100)] == [[0, 1], [2]]       # neighbours share one GET
    remote = ShardReader(["s3://data/r/blob.tar"], cache_dir=str(tmp_path / "cache"), cache_bytes=10_000)
    local = ShardReader([str(tmp_path / "blob.tar")])
    assert remote.read_many(reqs) == local.read_many(reqs)
    assert remote.stats["gets"] == 1                                     # all within the 64 KiB gap: one GET
    assert remote.read_many(reqs) == local.read_many(reqs) and remote.stats["cache_hits"] == 3

    missing = ShardReader(["s3://data/r/nope.tar"], retries=2, backoff_s=0.01)
    err = missing.read_many([(0, 0, 4)])[0]
    assert isinstance(err, OSError) and "nope.tar" in str(err)           # an error value, not a crash


def test_cache_keeps_to_its_size_limit(tmp_path):
    from aimv2data.loader.reader import SampleCache

    c = SampleCache(str(tmp_path), 10_000)
    for i in range(50):
        c.put("s3://b/x.tar", i * 1000, 1000, bytes(1000))
    c.evict()
    assert c.size() <= 10_000 and c.get("s3://b/x.tar", 49_000, 1000) == bytes(1000)


# -- bad input: one line, nothing written ---------------------------------------------------------

def test_bucket_that_does_not_exist(s3, tmp_path):
    res = cli("shard", tmp_path, "--output", "s3://no-such-bucket/m")
    assert res.exit_code != 0 and "bucket 'no-such-bucket' does not exist" in res.output
    lst = tmp_path / "l.parquet"
    pl.DataFrame({"url": ["http://127.0.0.1:1/a.jpg"]}).write_parquet(lst)
    res = cli("fetch", "--source", "parquet", "--url-list", lst, "--output", "s3://no-such-bucket/f")
    assert res.exit_code != 0 and "does not exist" in res.output


def test_missing_credentials_and_unreachable_endpoint(s3, monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    clear_fs_cache()
    with pytest.raises(storage.StorageError, match="no credentials|access denied") as e:
        storage.check_reachable("s3://data/x")
    assert "testing" not in str(e.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ENV["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_ENV["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    clear_fs_cache()
    try:
        with pytest.raises(storage.StorageError, match="does not answer"):
            storage.check_reachable("s3://data/x")
    finally:
        monkeypatch.undo()
        clear_fs_cache()


def test_scheme_without_a_backend_names_the_package(tmp_path):
    pytest.importorskip("s3fs")
    if __import__("importlib").util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed")
    res = cli("shard", "gs://bucket/shards", "--output", tmp_path / "m")
    assert res.exit_code != 0 and "pip install gcsfs" in res.output
    assert not (tmp_path / "m" / "_manifest.json").exists()


def test_ray_address_that_does_not_answer(tmp_path):
    pytest.importorskip("ray")
    from aimv2data.cluster import ClusterError, connect_ray

    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match="no Ray cluster answers"):
        connect_ray(addr)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "a.tar").write_bytes(b"")
    lst = tmp_path / "l.parquet"
    pl.DataFrame({"url": ["http://127.0.0.1:1/a.jpg"]}).write_parquet(lst)
    for args in (["shard", tmp_path / "s", "-o", tmp_path / "m"],
                 ["fetch", "--source", "parquet", "--url-list", lst, "--output", tmp_path / "f"]):
        res = cli(*args, "--distributor", "ray", "--ray-address", addr)
        assert res.exit_code != 0 and "no Ray cluster answers" in res.output
    assert not (tmp_path / "m").exists() and not (tmp_path / "f").exists()   # nothing written


# -- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_fetch_shard_load_train_from_s3_equal_local(s3, tmp_path):
    from aimv2data import demo_corpus as demo
    from aimv2data.loader.loader import Loader
    from aimv2data.serve import LoopbackServer
    from aimv2train.train.tokenizer import train_tokenizer
    from _train_fixtures import tiny_config
    from aimv2train.train.trainer import train

    demo.write_corpus(tmp_path)
    with LoopbackServer(directory=tmp_path / "images", slow_s=3) as srv:
        lists = demo.write_url_lists(tmp_path, srv.base_url)
        flags = ["--allow-private-addresses",       # the loopback image server
                 "--source", "coyo", "--shard-size", 32, "--processes", "1", "--download-threads", "8", "--timeout", "2"]
        _fs().put_file(str(lists["coyo"]), "data/lists/coyo.parquet")       # the url list in the bucket too
        r = cli("fetch", *flags, "--url-list", "s3://data/lists/", "--output", "s3://data/coyo")
        assert r.exit_code == 0, r.output
        assert cli("fetch", *flags, "--url-list", lists["coyo"], "--output", tmp_path / "coyo").exit_code == 0
    assert not (tmp_path / "s3:").exists()                      # nothing written to a local "s3:" folder
    remote = json.loads(storage.read_bytes("s3://data/coyo/fetch_summary.json"))
    assert remote["output"] == "s3://data/coyo" and remote["complete"]
    # img2dataset's own output is uploaded beside the shards (issue 23 point 10), not printed
    assert b"bwm-ng" in storage.read_bytes("s3://data/coyo/_logs/img2dataset.log") and "bwm-ng" not in r.output

    r = cli("shard", "s3://data/coyo", "--output", "s3://data/manifest")
    assert r.exit_code == 0, r.output
    assert cli("shard", tmp_path / "coyo", "--output", tmp_path / "manifest").exit_code == 0
    cols = ["key", "url", "sha256", "size", "width", "height", "bucket", "caption"]
    remote_rows = pl.concat([storage.read_parquet(f"s3://{p}") for p in _fs().glob("data/manifest/samples/*.parquet")])
    local_rows = pl.read_parquet(tmp_path / "manifest" / "samples" / "*.parquet")
    assert remote_rows.height > 0
    # same samples: the same keys hold the same bytes (offsets follow the order downloads finished in)
    assert remote_rows.select(cols).sort("key").equals(local_rows.select(cols).sort("key"))
    assert remote_rows["shard"].str.starts_with("s3://data/coyo/").all()

    # caption attach on both: the same synthetic captions on the same samples
    caps = tmp_path / "caps.parquet"
    local_rows.select("sha256", pl.col("caption").str.to_uppercase().alias("recap")).write_parquet(caps)
    for m in ("s3://data/manifest", tmp_path / "manifest"):
        r = cli("caption", "attach", m, "--captions", caps, "--on", "sha256", "--column", "recap")
        assert r.exit_code == 0 and f"{local_rows.height} of {local_rows.height} samples matched" in r.output, r.output
    assert not _fs().exists("data/manifest/_captions")              # per-part markers gone once complete

    # the loader: same keys, same pixels, same captions; a second epoch served from the cache
    kw = dict(batch_size=8, resolution=56)
    lr = Loader("s3://data/manifest", cache_dir=str(tmp_path / "cache"), cache_gb=1.0, **kw)
    ll = Loader(str(tmp_path / "manifest"), **kw)
    for _epoch in range(2):
        xs, ys = list(lr), list(ll)
        assert len(xs) == len(ys) == 10
        for x, y in zip(xs, ys):
            assert x.keys == y.keys and x.captions == y.captions and torch.equal(x.images, y.images)
    assert sum(r.stats["cache_hits"] for r in lr.maker.readers.values()) > 0 and lr.stats["replaced"] == 0

    res = cli("bench", "loader", "s3://data/manifest", "-B", 8, "-R", 56, "--steps", 3, "--warmup", 1, "--json")
    assert res.exit_code == 0, res.output

    res = cli("stats", "s3://data/manifest")
    assert res.exit_code == 0 and str(local_rows.height) in res.output, res.output
    tok = tmp_path / "tok.model"
    assert cli("tokenizer", "train", "s3://data/manifest", "-o", tmp_path / "tok_s3.model", "--vocab-size", 256,
               "--soft-limit").exit_code == 0
    train_tokenizer(tmp_path / "manifest", tok, vocab_size=256, soft_limit=True)
    assert (tmp_path / "tok_s3.model").read_bytes() == tok.read_bytes()    # same captions, same tokenizer
    losses = []
    for m in ("s3://data/manifest", str(tmp_path / "manifest")):
        out = tmp_path / ("run_s3" if m.startswith("s3") else "run_local")
        train(tiny_config(m, tok, out, steps=3, seed=3))
        losses.append([json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def _fs():
    import fsspec

    return fsspec.filesystem("s3")



def test_endpoint_from_fsspec_configuration(s3, tmp_path):
    """FSSPEC_S3_ENDPOINT_URL (fsspec's own configuration, read when fsspec is imported) works as well as
    AWS_ENDPOINT_URL."""
    import subprocess
    import sys

    storage.write_bytes("s3://data/cfg/hello.txt", b"hi")
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["FSSPEC_S3_ENDPOINT_URL"] = s3
    code = "from aimv2data import storage; print(storage.read_bytes('s3://data/cfg/hello.txt').decode())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "hi", out.stderr[-500:]


def test_store_errors_are_retried_with_backoff_then_reported(s3, tmp_path):
    """A throttled/5xx read is retried; one that keeps failing comes back as an error value (the loader
    replaces and counts that sample), after a bounded number of attempts."""
    import fsspec

    from aimv2data.loader.reader import ShardReader

    fsspec.filesystem("s3").pipe_file("data/r/flaky.tar", bytes(range(200)))
    reader = ShardReader(["s3://data/r/flaky.tar"], retries=3, backoff_s=0.001)
    real = reader._filesystem()
    calls = []

    class Flaky:                     # the real s3fs client, answering 503 to the first `fail` calls
        def __init__(self, fail):
            self.fail = fail

        def _strip_protocol(self, p):
            return real._strip_protocol(p)

        def cat_ranges(self, paths, starts, ends, **kw):
            calls.append(len(paths))
            if len(calls) <= self.fail:
                return [OSError("503 Slow Down")] * len(paths)
            return real.cat_ranges(paths, starts, ends, **kw)

    reader._fs = Flaky(fail=2)
    assert reader.read_many([(0, 10, 5)]) == [bytes(range(10, 15))] and len(calls) == 3
    assert reader.stats["retries"] == 2
    calls.clear()
    reader._fs = Flaky(fail=99)
    err = reader.read_many([(0, 10, 5)])[0]
    assert isinstance(err, OSError) and "after 4 attempt(s)" in str(err) and "503" in str(err)
    assert len(calls) == 4 and reader.stats["failed"] == 1


@pytest.mark.slow
def test_missing_shard_object_costs_its_samples_not_the_run(s3, tmp_path):
    """A tar deleted from the bucket after sharding: its samples are replaced and counted, batches still come,
    and loader worker processes read from the store as the main process does."""
    import fsspec

    from _shard_fixtures import good_tar
    from aimv2data.loader.loader import Loader
    from aimv2data.manifest.build import build_manifest

    (tmp_path / "s").mkdir()
    good_tar(tmp_path / "s" / "00000.tar", 40)
    good_tar(tmp_path / "s" / "00001.tar", 4, start=40, seed=1)
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "s") + "/", "data/gone/s/", recursive=True)
    build_manifest(["s3://data/gone/s"], "s3://data/gone/m", progress=False, idx="none")
    build_manifest([str(tmp_path / "s")], tmp_path / "m", progress=False, idx="none")
    a = list(Loader("s3://data/gone/m", batch_size=8, resolution=28, workers=2))
    b = list(Loader(str(tmp_path / "m"), batch_size=8, resolution=28))
    assert len(a) == len(b) and all(x.keys == y.keys and torch.equal(x.images, y.images) for x, y in zip(a, b))
    fs.rm_file("data/gone/s/00001.tar")
    loader = Loader("s3://data/gone/m", batch_size=8, resolution=28, read_retries=1)
    batches = list(loader)
    assert len(batches) == len(b) and loader.stats["replaced"] > 0
    assert all(reason.startswith("read:") and "00001.tar" in reason for _, reason in loader.stats["replaced_keys"])
