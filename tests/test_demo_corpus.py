"""The embedded demo corpus, its url lists, the loopback server, and `aimv2 demo` end to end."""
from __future__ import annotations

import io
import json
import socket
import struct
import time
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
from _fetch_fixtures import decode, snapshot
from click.testing import CliRunner
from PIL import Image, ImageOps

from aimv2data import demo
from aimv2data.serve import BOMB_SIDE, HOSTILE, LoopbackServer, small_jpeg
from cli.main import main


def test_corpus_is_deterministic():
    fresh = demo.corpus.__wrapped__(demo.SEED)  # rebuilt, not the cached copy
    assert [(i.name, i.data) for i in fresh] == [(i.name, i.data) for i in demo.corpus()]


def test_corpus_covers_formats_sizes_and_aspects():
    images = demo.corpus()
    assert 60 <= len(images) <= 100
    assert Counter(i.kind for i in images) == {"photo": 20, "generated": 60}
    kinds = Counter((i.format, i.progressive) for i in images)
    assert kinds[("jpeg", False)] >= 30 and kinds[("jpeg", True)] >= 4
    assert kinds[("png", False)] >= 8 and kinds[("webp", False)] >= 4
    assert {i.mode for i in images if i.format == "png"} == {"L", "RGB", "RGBA"}
    aspects = [i.display_size[0] / i.display_size[1] for i in images]
    assert min(aspects) <= 0.26 and max(aspects) >= 3.9  # 1:4 .. 4:1
    long_sides = [max(i.width, i.height) for i in images if i.kind == "generated"]
    assert min(long_sides) <= 100 and max(long_sides) >= 1400
    assert len({i.name for i in images}) == len({i.uid for i in images}) == len({i.id for i in images}) == len(images)
    assert all(i.caption and len(i.caption) > 15 for i in images)


def test_every_image_decodes_to_its_stated_size_mode_and_format():
    for im in demo.corpus():
        pil = decode(im.data)
        assert pil.format == im.format.upper(), im.name
        assert (pil.width, pil.height, pil.mode) == (im.width, im.height, im.mode), im.name
        if im.format == "jpeg":
            assert bool(pil.info.get("progressive") or pil.info.get("progression")) == im.progressive, im.name


def test_exif_orientation_gives_the_intended_picture():
    """After applying EXIF orientation, generated images show their red marker top-left."""
    oriented = [i for i in demo.corpus() if i.orientation != 1]
    assert sorted(i.orientation for i in oriented) == [2, 3, 4, 5, 6, 6, 7, 8]
    for im in demo.corpus():
        pil = decode(im.data)
        assert pil.getexif().get(0x0112, 1) == im.orientation
        shown = ImageOps.exif_transpose(pil)
        assert shown.size == im.display_size, im.name
        if im.kind == "generated":
            r, g, b = shown.convert("RGB").getpixel((1, 1))
            assert r > 200 and g < 60 and b < 60, (im.name, im.orientation)


def test_write_corpus_is_idempotent(tmp_path):
    p = demo.write_corpus(tmp_path)
    first = snapshot(tmp_path)
    demo.write_corpus(tmp_path)
    assert snapshot(tmp_path) == first
    meta = json.loads(p.read_text())
    assert [m["name"] for m in meta["images"]] == [i.name for i in demo.corpus()]
    assert all((tmp_path / "images" / i.name).read_bytes() == i.data for i in demo.corpus())


def test_url_lists_have_the_published_layouts(tmp_path):
    paths = demo.write_url_lists(tmp_path, "http://127.0.0.1:1234")
    images = demo.corpus()
    coyo = pl.read_parquet(paths["coyo"])
    assert coyo.columns[:5] == ["id", "url", "text", "width", "height"]
    assert coyo.height == len(images) + len(demo.hostile_rows())
    assert coyo["url"][0] == f"http://127.0.0.1:1234/{images[0].name}"
    pool = pl.read_parquet(paths["dfn_pool"])
    assert {"uid", "url", "text", "original_width", "original_height", "sha256"} <= set(pool.columns)
    assert pool["sha256"].to_list() == [i.sha256 for i in images]
    index = np.load(paths["dfn_index"])
    assert index.dtype == np.dtype([("f0", "<u8"), ("f1", "<u8")])
    assert np.array_equal(index, np.sort(index))
    want = {i.uid for i in images if i.in_dfn}
    got = {f"{int(a):016x}{int(b):016x}" for a, b in index.tolist()}
    assert got == want and len(want) == 54  # 2/3 of the pool


# -- the loopback server -----------------------------------------------------------------------
def _get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_server_serves_routes_and_a_directory(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"jpeg bytes")
    routes = {"/x.bin": (201, {"X-Test": "1"}, b"payload"), "/y.png": b"png bytes"}
    with LoopbackServer(routes=routes, directory=tmp_path) as srv:
        assert _get(srv.url("a.jpg"))[::2] == (200, b"jpeg bytes")
        status, headers, body = _get(srv.url("/x.bin"))
        assert (status, headers["X-Test"], body) == (201, "1", b"payload")
        status, headers, body = _get(srv.url("/y.png"))
        assert (status, headers["Content-Type"], body) == (200, "image/png", b"png bytes")
        assert _get(srv.url("/../etc/passwd"))[0] == 404
        assert _get(srv.url("/missing.jpg"))[0] == 404
        assert srv.hits["/a.jpg"] == 1 and srv.hits["/missing.jpg"] == 1


def test_hostile_routes_misbehave_as_named():
    with LoopbackServer(slow_s=5) as srv:
        assert _get(srv.url("/hostile/404.jpg"))[0] == 404
        assert _get(srv.url("/hostile/500.jpg"))[0] == 500
        assert _get(srv.url("/hostile/html.jpg"))[2].startswith(b"<!DOCTYPE html>")
        assert _get(srv.url("/hostile/empty.jpg"))[::2] == (200, b"")
        trunc = _get(srv.url("/hostile/truncated.jpg"))[2]
        assert small_jpeg(1).startswith(trunc) and len(trunc) < len(small_jpeg(1))
        status, headers, body = _get(srv.url("/hostile/noai.jpg"))
        assert "noai" in headers["X-Robots-Tag"] and decode(body).size == (96, 64)
        bomb = _get(srv.url("/hostile/bomb.png"))[2]
        assert len(bomb) < 8_000_000
        assert bomb[12:16] == b"IHDR" and struct.unpack(">II", bomb[16:24]) == (BOMB_SIDE, BOMB_SIDE)
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(bomb))
        t0 = time.monotonic()
        with pytest.raises((socket.timeout, TimeoutError, urllib.error.URLError)):
            _get(srv.url("/hostile/slow.jpg"), timeout=0.5)
        assert time.monotonic() - t0 < 3
    assert set(HOSTILE) >= {"/hostile/404.jpg", "/hostile/bomb.png", "/hostile/noai.jpg"}


def test_stop_returns_promptly_with_a_stalled_request():
    import threading

    srv = LoopbackServer(slow_s=30).start()
    outcome = []

    def client():
        try:
            outcome.append(_get(srv.url("/hostile/slow.jpg"), timeout=60))
        except Exception as e:  # the server hangs up
            outcome.append(e)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    srv.stop()
    t.join(5)
    assert time.monotonic() - t0 < 3
    assert len(outcome) == 1 and isinstance(outcome[0], Exception)  # no image after a stall cut short


# -- aimv2 demo --------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_runs_end_to_end_and_a_rerun_skips_every_step(tmp_path):
    out = tmp_path / "demo_out"
    res = CliRunner().invoke(main, ["demo", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    coyo = json.loads((out / "fetch_coyo" / "fetch_summary.json").read_text())
    dfn = json.loads((out / "fetch_dfn" / "fetch_summary.json").read_text())
    assert coyo["complete"] and coyo["samples"]["success"] == 80
    assert coyo["failures_by_reason"] == {r: 1 for _, r in demo.hostile_rows()}
    assert dfn["complete"] and dfn["samples"]["success"] == 54 and dfn["failures_by_reason"] == {}
    # shard + synthetic captions: every fetched image is a manifest row with its synthetic captions
    rows = pl.read_parquet(out / "manifest" / "samples" / "*.parquet")
    assert rows.height == 80 + 54
    assert rows["syn_synthetic"].list.len().min() == 2
    assert (out / "tok.model").is_file()
    # training: the loss falls clearly at fixed resolution; native resolution gives finite losses
    fixed = json.loads((out / "train_fixed" / "summary.json").read_text())
    native = json.loads((out / "train_native" / "summary.json").read_text())
    assert fixed["status"] == "done" and fixed["loss_end"] < 0.5 * fixed["loss_start"]
    assert native["status"] == "done" and native["stage"] == "native"
    assert np.isfinite(native["loss_img_end"]) and np.isfinite(native["loss_text_end"])
    # export: the transformers folder holds the native run's encoder
    from aimv2train.interop import load_encoder

    exported, trained = load_encoder(out / "export_hf"), load_encoder(out / "train_native")
    assert exported.cfg.pos_embed == "sincos"
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in exported.state_dict().items())
    before = snapshot(out)
    res = CliRunner().invoke(main, ["demo", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.count("already done") == 9
    assert snapshot(out) == before
