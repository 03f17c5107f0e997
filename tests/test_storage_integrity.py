"""Right bytes or a clear error, never another sample's bytes (issue 20, points 1-4): reads from object storage
after cache hits and retries, a tar replaced since its manifest was built, relative shard paths in a manifest
copied to a bucket, and an unreachable store told apart from a missing manifest or damaged shards. Against a
real S3-protocol server on loopback (moto), and a pausable TCP proxy in front of it for outages."""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from _s3_fixtures import PausableProxy, clear_fs_cache, s3_server
from _shard_fixtures import good_tar
from aimv2data import storage

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def s3():
    with s3_server(buckets=("data",)) as endpoint:
        yield endpoint


@pytest.fixture
def outage(s3, monkeypatch):
    """A proxy in front of moto, the AWS_* endpoint pointed at it, each botocore call tried once."""
    with PausableProxy(int(s3.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        clear_fs_cache()
        try:
            yield proxy
        finally:
            proxy.resume()
            monkeypatch.undo()
            clear_fs_cache()


def _fs():
    import fsspec

    return fsspec.filesystem("s3")


def _images(tar: Path) -> list[tuple[int, int, str]]:
    """(offset, size, key) of every image member, from Python's tarfile."""
    with tarfile.open(tar) as tf:
        return [(m.offset_data, m.size, m.name.split(".")[0]) for m in tf.getmembers() if m.name.endswith(".jpg")]


def _rewrite(src: Path, dst: Path, rename=lambda key: key) -> None:
    """`src`'s members into `dst` with the same layout, keys renamed (a same-length name keeps every offset:
    `dst` has the size of `src`, member for member)."""
    with tarfile.open(src) as tf, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as out:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            data = tf.extractfile(m).read()
            ti = tarfile.TarInfo(f"{rename(key)}.{ext}")
            ti.size, ti.mtime = len(data), m.mtime
            out.addfile(ti, io.BytesIO(data))


# -- 1. the right bytes after cache hits and retries ----------------------------------------------

def test_remote_reads_are_right_after_cache_hits_and_retries(s3, tmp_path):
    """Batches where only some reads go to the store (the others cached, or retried after a store error)
    return each request's own bytes: every byte compared to the tar on local disk."""
    from aimv2data.loader.reader import ShardReader

    tar = tmp_path / "00000.tar"
    good_tar(tar, 16)
    _fs().put_file(str(tar), "data/p1/00000.tar")
    disk = tar.read_bytes()
    members = _images(tar)
    truth = [disk[o:o + n] for o, n, _ in members]
    for with_key in (True, False):
        reqs = [(0, o, n, k) if with_key else (0, o, n) for o, n, k in members]
        cache = tmp_path / f"cache{with_key}"
        reader = ShardReader(["s3://data/p1/00000.tar"], cache_dir=str(cache), cache_bytes=10 ** 7)
        assert reader.read_many(reqs[::2]) == truth[::2]                  # 8 cached ...
        assert reader.read_many(reqs) == truth                            # ... + 8 new: all 16 right
        assert reader.stats["cache_hits"] == 8
        assert reader.read_many(reqs[3:11]) == truth[3:11]                # all cached

    # a store error on some ranges of the first GET round: the retry reads only those, in their own slots
    reader = ShardReader(["s3://data/p1/00000.tar"], retries=2, backoff_s=0.001, coalesce_gap=-1)
    real, rounds = reader._filesystem(), []

    class FailSome:                  # the real s3fs client, answering 503 to every third range of round one
        def _strip_protocol(self, p):
            return real._strip_protocol(p)

        def cat_ranges(self, paths, starts, ends, **kw):
            rounds.append(len(paths))
            got = real.cat_ranges(paths, starts, ends, **kw)
            return [OSError("503 Slow Down") if len(rounds) == 1 and j % 3 == 1 else d for j, d in enumerate(got)]

    reader._fs = FailSome()
    reqs = [(0, o, n, k) for o, n, k in members]
    assert reader.read_many(reqs) == truth
    assert rounds == [16, 5] and reader.stats["retries"] == 5


def test_loader_from_the_store_with_a_cache_gives_the_local_batches(s3, tmp_path):
    """The loader over a manifest whose tars are in the store, a cache filled by epoch one and partly evicted:
    the same keys, pixels and captions as from local disk, and nothing replaced."""
    from aimv2data.loader.loader import Loader
    from aimv2data.manifest.build import build_manifest

    (tmp_path / "s").mkdir()
    good_tar(tmp_path / "s" / "00000.tar", 40)
    build_manifest([str(tmp_path / "s")], tmp_path / "m", progress=False, idx="none")
    _fs().put_file(str(tmp_path / "s" / "00000.tar"), "data/p1l/s/00000.tar")
    remote = _variant(tmp_path / "m", tmp_path / "m_s3", "s3://data/p1l/s/00000.tar")  # same folder name: same crops
    kw = dict(batch_size=8, resolution=28)
    local = Loader(str(tmp_path / "m"), **kw)
    loader = Loader(str(remote), cache_dir=str(tmp_path / "cache"), cache_gb=1.0, **kw)
    for epoch in range(3):
        if epoch == 2:                          # half the cache gone: hits and misses in the same batches
            for f in sorted((tmp_path / "cache").rglob("*"))[::2]:
                if f.is_file():
                    f.unlink()
        for x, y in zip(list(loader), list(local)):
            assert x.keys == y.keys and x.captions == y.captions and torch.equal(x.images, y.images)
    assert loader.stats["replaced"] == 0
    assert sum(r.stats["cache_hits"] for r in loader.maker.readers.values()) > 0


def _variant(manifest: Path, dst: Path, shard: str) -> Path:
    """A copy of `manifest` whose rows point at `shard`."""
    shutil.copytree(manifest, dst)
    for f in sorted((dst / "samples").glob("*.parquet")):
        pl.read_parquet(f).with_columns(pl.lit(shard).alias("shard")).write_parquet(f)
    return dst


# -- 2. a tar replaced since the build --------------------------------------------------------------

def _changed_tar_manifest(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(manifest, its tar, a tar of the same size with other keys)."""
    from aimv2data.manifest.build import build_manifest

    (tmp_path / "s").mkdir()
    good_tar(tmp_path / "src.tar", 24)
    tar, other = tmp_path / "s" / "00000.tar", tmp_path / "other.tar"
    _rewrite(tmp_path / "src.tar", tar)
    _rewrite(tmp_path / "src.tar", other, rename=lambda k: f"{int(k) + 100:09d}")
    assert tar.stat().st_size == other.stat().st_size and tar.read_bytes() != other.read_bytes()
    build_manifest([str(tmp_path / "s")], tmp_path / "m", progress=False, idx="none")
    return tmp_path / "m", tar, other


@pytest.mark.parametrize("workers", [0, 2])
def test_a_tar_replaced_by_another_of_the_same_size_is_refused(tmp_path, workers):
    from aimv2data.loader.loader import Loader
    from aimv2data.loader.reader import TarChangedError

    manifest, tar, other = _changed_tar_manifest(tmp_path)
    assert len(list(Loader(str(manifest), batch_size=8, resolution=28, workers=workers))) == 3
    os.replace(other, tar)
    with pytest.raises(TarChangedError) as e:
        list(Loader(str(manifest), batch_size=8, resolution=28, workers=workers))
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg                       # one line, also from a worker
    assert str(tar) in msg and "the tar changed since the manifest was built" in msg and "aimv2 shard" in msg


def test_a_tar_replaced_in_the_store_is_refused(s3, tmp_path):
    from aimv2data.loader.loader import Loader
    from aimv2data.loader.reader import TarChangedError

    manifest, tar, other = _changed_tar_manifest(tmp_path)
    _fs().put_file(str(tar), "data/p2/00000.tar")
    remote = _variant(manifest, tmp_path / "m_s3", "s3://data/p2/00000.tar")
    assert len(list(Loader(str(remote), batch_size=8, resolution=28))) == 3
    _fs().put_file(str(other), "data/p2/00000.tar")
    with pytest.raises(TarChangedError, match="s3://data/p2/00000.tar: the tar changed since the manifest was built"):
        list(Loader(str(remote), batch_size=8, resolution=28))


def test_a_changed_tar_stops_train_with_one_line(tmp_path):
    """`aimv2 train` on a tar swapped since the build: exit 1, one line naming the tar and what to rerun,
    not a run that trains on other samples' images and blames the shards."""
    from _train_fixtures import build
    from cli.main import main

    manifest, tok = build(tmp_path)
    tar = tmp_path / "shards" / "00000.tar"
    _rewrite(tar, tmp_path / "other.tar", rename=lambda k: f"{int(k) + 500:09d}")
    os.replace(tmp_path / "other.tar", tar)
    res = CliRunner().invoke(main, ["train", "-m", str(manifest), "-t", str(tok), "-o", str(tmp_path / "run"),
                                    "--model", "tiny", "--resolution", "56", "--batch-size", "8", "--steps", "2",
                                    "--workers", "0", "--no-progress"])
    assert res.exit_code == 1, res.output
    assert "00000.tar: the tar changed since the manifest was built" in res.output and "aimv2 shard" in res.output
    assert "Traceback" not in res.output


def test_header_check_knows_long_and_pax_names(tmp_path):
    """Names a ustar header cannot hold whole (long paths in pax or GNU records, non-ASCII keys) still pass
    the check where the tar is the one indexed."""
    from aimv2data.loader.reader import ShardReader, header_problem

    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        tar = tmp_path / f"t{fmt}.tar"
        names = ["d/000001.jpg", "a" * 40 + "/" + "b" * 45 + "/k.jpg"]
        if fmt != tarfile.USTAR_FORMAT:
            names += ["x/" + "c" * 150 + ".jpg", "dir/ключ.jpg"]
        with tarfile.open(tar, "w", format=fmt) as tf:
            for i, name in enumerate(names):
                ti = tarfile.TarInfo(name)
                ti.size = 100 + i
                tf.addfile(ti, io.BytesIO(bytes(ti.size)))
        with tarfile.open(tar) as tf:
            reqs = [(0, m.offset_data, m.size, m.name.rsplit(".", 1)[0]) for m in tf.getmembers()]
        assert ShardReader([str(tar)]).read_many(reqs) == [bytes(100 + i) for i in range(len(names))]
        block = tar.read_bytes()[reqs[0][1] - 512:reqs[0][1]]
        assert header_problem(block, "d/000001", 100) is None
        assert "d/000001" in header_problem(block, "d/000002", 100)
        assert "100 bytes" in header_problem(block, "d/000001", 99)
        assert header_problem(bytes(512), "d/000001", 100) == "no tar header there"


# -- 3. relative shard paths in a manifest copied to a bucket -----------------------------------------

def test_relative_shard_paths_resolve_under_a_url(tmp_path):
    assert storage.resolve_against("s3://b/manifest", "../fetch_dfn/00006.tar") == "s3://b/fetch_dfn/00006.tar"
    assert storage.resolve_against("s3://b/x/manifest/", "./../s/a.tar") == "s3://b/x/s/a.tar"
    assert storage.resolve_against("s3://b/manifest", "s3://c/a.tar") == "s3://c/a.tar"
    with pytest.raises(storage.StorageError, match="climbs out of the bucket"):
        storage.resolve_against("s3://b/manifest", "../../other/a.tar")


def test_manifest_copied_to_a_bucket_reads_its_relative_tars(s3, tmp_path):
    """A local manifest (`shard` = `../fetch_dfn/00000.tar`) copied with its tars to s3://: the loader reads
    the same batches from there; once the tars are gone, it says so at start-up, in one line."""
    from aimv2data.loader.loader import Loader
    from aimv2data.loader.samples import ManifestError
    from aimv2data.manifest.build import build_manifest

    (tmp_path / "fetch_dfn").mkdir()
    good_tar(tmp_path / "fetch_dfn" / "00000.tar", 16)
    good_tar(tmp_path / "fetch_dfn" / "00001.tar", 16, start=16, seed=1)
    build_manifest([str(tmp_path / "fetch_dfn")], tmp_path / "manifest", progress=False, idx="none")
    assert pl.read_parquet(tmp_path / "manifest" / "samples" / "*.parquet")["shard"][0].startswith("../fetch_dfn/")
    for d in ("fetch_dfn", "manifest"):
        _fs().put(str(tmp_path / d) + "/", f"data/p3/{d}/", recursive=True)
    kw = dict(batch_size=8, resolution=28)
    remote, local = Loader("s3://data/p3/manifest", **kw), Loader(str(tmp_path / "manifest"), **kw)
    assert remote.table.shards == ["s3://data/p3/fetch_dfn/00000.tar", "s3://data/p3/fetch_dfn/00001.tar"]
    for x, y in zip(list(remote), list(local)):
        assert x.keys == y.keys and torch.equal(x.images, y.images)
    assert remote.stats["replaced"] == 0

    _fs().rm(["data/p3/fetch_dfn/00000.tar", "data/p3/fetch_dfn/00001.tar"])
    with pytest.raises(ManifestError, match="none of the 2 tars of this share checked exists") as e:
        Loader("s3://data/p3/manifest", **kw)
    assert "s3://data/p3/fetch_dfn/0000" in str(e.value)


# -- 4. an unreachable store, named as such ---------------------------------------------------------------

def test_an_unreachable_store_is_not_a_missing_manifest(s3, tmp_path, outage):
    from aimv2data.loader.samples import Manifest, ManifestError
    from cli.main import main

    (tmp_path / "s").mkdir()
    good_tar(tmp_path / "s" / "00000.tar", 4)
    from aimv2data.manifest.build import build_manifest

    build_manifest([str(tmp_path / "s")], tmp_path / "m", progress=False, idx="none")
    _fs().put(str(tmp_path / "m") + "/", "data/p4/m/", recursive=True)
    Manifest("s3://data/p4/m")
    with pytest.raises(ManifestError, match="not found: pass a manifest directory"):
        Manifest("s3://data/p4/nothing-here")
    outage.pause()
    with pytest.raises(ManifestError) as e:
        Manifest("s3://data/p4/m")
    msg = str(e.value)
    assert f"the store is unreachable: the endpoint {outage.url} does not answer (" in msg   # endpoint, error
    assert "Error: " in msg                             # botocore's error named (which one depends on the pool)
    assert "not found" not in msg and "testing" not in msg                  # and no credential
    for args in (["stats", "s3://data/p4/m"], ["tokenizer", "train", "s3://data/p4/m", "-o", str(tmp_path / "t.model")]):
        r = CliRunner().invoke(main, args)    # the other readers of a manifest say the same
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "the store is unreachable" in r.output and "not found" not in r.output, r.output


def test_an_outage_is_counted_apart_from_damaged_samples(s3, tmp_path, outage, monkeypatch):
    """The store drops every connection during a batch's first reads: those samples are replaced and counted as
    `replaced_unreachable` in metrics.jsonl and the summary, a damaged sample as `replaced_damaged`, and the
    warning names both causes apart (an outage is not "check the shards")."""
    from _train_fixtures import build
    from aimv2data.loader.reader import ShardReader
    from cli.main import main

    manifest, tok = build(tmp_path)
    for d in ("shards", "manifest"):
        _fs().put(str(tmp_path / d) + "/", f"data/p5/{d}/", recursive=True)
    real, calls = ShardReader.read_many, []

    def read_many(self, requests):   # the first batch's reads meet a store that is down
        calls.append(len(requests))
        if len(calls) == 1:
            outage.pause()
        try:
            return real(self, requests)
        finally:
            outage.resume()

    monkeypatch.setattr(ShardReader, "read_many", read_many)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "-m", "s3://data/p5/manifest", "-t", str(tok), "-o", str(out),
                                    "--model", "tiny", "--resolution", "56", "--batch-size", "8", "--steps", "2",
                                    "--workers", "0", "--no-progress"], env={"COLUMNS": "240"})  # no wrapping
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["replaced"], r["replaced_unreachable"], r["replaced_damaged"]) for r in recs] == [(8, 8, 0), (0, 0, 0)]
    s = json.loads((out / "summary.json").read_text())
    assert (s["replaced"], s["replaced_unreachable"], s["replaced_damaged"]) == (8, 8, 0)
    assert "did not answer" in s["replaced_warning"] and "check the shards" not in s["replaced_warning"]
    assert all(why.startswith("unreachable: ") and "did not answer" in why for _, why in s["replaced_examples"])
    assert "8 because the store did not answer, 0 missing or damaged" in res.output


def test_replaced_summary_splits_and_reads_old_runs():
    from aimv2train.train.health import replaced_summary

    old = [{"batch": 8, "replaced": 2}]                                      # metrics.jsonl before the split
    new = [{"batch": 8, "replaced": 3, "replaced_unreachable": 2, "replaced_damaged": 1}]
    examples = [["k1", "unreachable: s3://b/a.tar: ... the store did not answer"], ["k2", "read: gone.tar: ..."]]
    s = replaced_summary(old + new, examples, 0.02)
    assert (s["replaced"], s["replaced_unreachable"], s["replaced_damaged"], s["draws"]) == (5, 2, 3, 16)
    w = s["replaced_warning"]
    assert "2 because the store did not answer (e.g. k1:" in w and "3 for samples that could not be read" in w
    assert "check the shards" in w and w.index("k2") > w.index("3 for samples")
    assert replaced_summary(old, [], 0.9)["replaced_damaged"] == 2 and "replaced_warning" not in replaced_summary(
        old, [], 0.9)


def test_an_endpoint_port_holding_403_is_not_access_denied():
    # Seen: a proxy on port 36403 turned an outage into "access denied" (the status-code test matched the port)
    from aimv2data.storage import friendly

    e = ConnectionRefusedError("Could not connect to the endpoint URL: 'http://127.0.0.1:36403/data'")
    assert "the store is unreachable" in str(friendly(e, "s3://data/m"))
    denied = OSError("An error occurred (403) when calling the HeadObject operation: Forbidden")
    assert "access denied" in str(friendly(denied, "s3://data/m"))
