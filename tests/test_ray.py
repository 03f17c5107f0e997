"""Ray as the distributed engine: on a local Ray cluster (127.0.0.1, 2 CPUs, started and shut down here),
`shard --distributor ray` gives the same manifest rows as the multiprocessing run, and `fetch
--distributor ray` (img2dataset's Ray distributor) the same samples."""
from __future__ import annotations

import pytest

from _fetch_fixtures import read_shards
from _shard_fixtures import good_tar


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from aimv2data.environment import keep_signal_handlers

    with keep_signal_handlers():  # ray.init's SIGTERM handler must not outlive this test in the pytest process
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200_000_000, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_shard_and_fetch_under_ray_equal_multiprocessing(ray_cluster, tmp_path):
    import polars as pl

    from aimv2data import demo_corpus as demo
    from aimv2data.fetch import FetchOptions, fetch
    from aimv2data.manifest.build import build_manifest
    from aimv2data.serve import LoopbackServer

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        good_tar(shards / f"{i:05d}.tar", 12, start=12 * i, seed=i)
    a = build_manifest([str(shards)], tmp_path / "m_ray", distributor="ray", progress=False, idx="manifest")
    b = build_manifest([str(shards)], tmp_path / "m_mp", workers=2, progress=False, idx="manifest")
    assert a["merged"] and b["merged"] and a["processed"] == 3
    cols = ["key", "shard", "offset", "size", "width", "height", "bucket", "caption", "sha256"]
    ra = pl.read_parquet(tmp_path / "m_ray" / "samples" / "*.parquet").select(cols).sort("key")
    rb = pl.read_parquet(tmp_path / "m_mp" / "samples" / "*.parquet").select(cols).sort("key")
    assert ra.height == 36 and ra.equals(rb)
    again = build_manifest([str(shards)], tmp_path / "m_ray", distributor="ray", progress=False, idx="manifest")
    assert again["processed"] == 0 and again["skipped"] == 3                 # resumable, as before

    demo.write_corpus(tmp_path)
    with LoopbackServer(directory=tmp_path / "images", hostile=False) as srv:
        lists = demo.write_url_lists(tmp_path, srv.base_url)
        kw = dict(source="coyo", url_lists=[str(lists["coyo"])], shard_size=32, processes=1, threads=8, timeout=2,
                  allow_private_addresses=True)
        s_ray = fetch(FetchOptions(output=str(tmp_path / "f_ray"), distributor="ray", **kw))
        s_mp = fetch(FetchOptions(output=str(tmp_path / "f_mp"), **kw))
    assert s_ray["samples"]["success"] == s_mp["samples"]["success"] > 0
    x, y = read_shards(tmp_path / "f_ray"), read_shards(tmp_path / "f_mp")
    assert x.keys() == y.keys() and all(x[k]["jpg"] == y[k]["jpg"] for k in x)


@pytest.mark.slow
def test_caption_generate_one_ray_task_per_part_equals_local(ray_cluster, tmp_path):
    import polars as pl

    from aimv2data.manifest.build import build_manifest
    from aimv2data.manifest.captions import generate
    from test_manifest_captions import tiny_captioner

    shards = tmp_path / "shards"
    shards.mkdir()
    good_tar(shards / "00000.tar", 5, seed=1)
    good_tar(shards / "00001.tar", 5, start=5, seed=2)
    build_manifest([str(shards)], tmp_path / "m", progress=False, idx="none")
    tiny_captioner(tmp_path / "tinycap")
    kw = dict(batch_size=5, max_new_tokens=5, progress=False)
    a = generate(tmp_path / "m", str(tmp_path / "tinycap"), output=tmp_path / "ray.parquet", distributor="ray", **kw)
    b = generate(tmp_path / "m", str(tmp_path / "tinycap"), output=tmp_path / "local.parquet", **kw)
    assert a["captioned"] == b["captioned"] == 10
    assert pl.read_parquet(tmp_path / "ray.parquet").sort("key").equals(pl.read_parquet(tmp_path / "local.parquet").sort("key"))
