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
from _timeouts import scaled
from click.testing import CliRunner
from PIL import Image, ImageOps

from aimv2data import demo_corpus as demo
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


def _orientation_energy(arr: np.ndarray) -> dict[str, float]:
    """Mean colour distance (L1 over RGB) between neighbouring pixels along x, y and the two diagonals."""
    a = arr.astype(np.float64)

    def step(u, v):
        return np.abs(u - v).sum(-1).mean()
    return {"x": step(a[:, 1:], a[:, :-1]), "y": step(a[1:], a[:-1]),
            "d": step(a[1:, 1:], a[:-1, :-1]), "a": step(a[1:, :-1], a[:-1, 1:])}


def _looks_like(kind: str, arr: np.ndarray) -> bool:
    """What a person sees (pixel noise keeps the ratios modest): horizontal stripes change along y,
    vertical along x, diagonal (x + y) stripes stay constant along the anti-diagonal, a checkerboard
    changes along both axes."""
    e = _orientation_energy(arr)
    if kind == "horizontal":
        return e["y"] > 1.5 * e["x"]
    if kind == "vertical":
        return e["x"] > 1.5 * e["y"]
    if kind == "diagonal":
        return e["d"] > 2 * e["a"]
    return min(e["x"], e["y"]) > 0.5 * max(e["x"], e["y"]) and e["a"] > 0.5 * e["d"]


def test_patterns_show_the_texture_their_caption_names():
    pats = demo.patterns()
    assert [(i.name, i.data) for i in demo.patterns.__wrapped__(demo.N_PATTERNS, demo.SEED)] == \
        [(i.name, i.data) for i in pats]
    assert len(pats) == demo.N_PATTERNS and Counter(i.caption for i in pats) == \
        {c: demo.N_PATTERNS // 4 for c in demo.PATTERNS.values()}
    by_caption = {v: k for k, v in demo.PATTERNS.items()}
    means = {k: [] for k in demo.PATTERNS}
    for im in pats:
        pil = decode(im.data)
        assert (pil.format, pil.size, pil.mode, im.kind) == ("JPEG", (56, 56), "RGB", "pattern")
        assert not pil.info.get("progressive") and not pil.info.get("progression")
        arr = np.asarray(pil)
        assert _looks_like(by_caption[im.caption], arr), im.name
        means[by_caption[im.caption]].append(arr.reshape(-1, 3).mean(0))
    # colours are random per image: the class-mean colours are all close to mid-grey
    centres = np.array([np.mean(m, 0) for m in means.values()])
    assert np.abs(centres - 127.5).max() < 25
    all_ids = [i.id for i in demo.all_images(n_patterns=demo.N_PATTERNS)]
    assert len(set(all_ids)) == len(all_ids) == 80 + demo.N_PATTERNS


def test_probe_set_is_labelled_held_out_and_idempotent(tmp_path):
    tr, va = demo.write_probe_set(tmp_path, n_train=5, n_val=3)
    first = snapshot(tmp_path)
    demo.write_probe_set(tmp_path, n_train=5, n_val=3)
    assert snapshot(tmp_path) == first
    for split, n in ((tr, 5), (va, 3)):
        assert sorted(d.name for d in split.iterdir()) == sorted(demo.PATTERNS)
        for d in split.iterdir():
            files = sorted(d.glob("*.png"))
            assert len(files) == n and all(_looks_like(d.name, np.asarray(Image.open(f))) for f in files)
    shown = [np.asarray(Image.open(f)).tobytes() for f in sorted(tmp_path.rglob("*.png"))]
    assert len(set(shown)) == len(shown) == 4 * (5 + 3)  # no image twice across train and val


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
    # with the demo's patterns: they follow the corpus in both lists, captions and sha256 included
    paths = demo.write_url_lists(tmp_path / "p", "http://127.0.0.1:1234", n_patterns=8)
    coyo, pool = pl.read_parquet(paths["coyo"]), pl.read_parquet(paths["dfn_pool"])
    pats = demo.patterns(8)
    assert coyo.height == len(images) + 8 + len(demo.hostile_rows())
    assert coyo["text"][len(images):len(images) + 8].to_list() == [p.caption for p in pats]
    assert pool["sha256"].to_list()[len(images):] == [p.sha256 for p in pats]
    assert len(np.load(paths["dfn_index"])) == 54 + sum(p.in_dfn for p in pats)


# -- the loopback server -----------------------------------------------------------------------
def _get(url, timeout=None):
    try:   # the default bounds a hang only: a loaded machine is slow, not broken
        with urllib.request.urlopen(url, timeout=timeout or scaled(30)) as r:
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
    res = CliRunner().invoke(main, ["demo", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    coyo = json.loads((out / "fetch_coyo" / "fetch_summary.json").read_text())
    dfn = json.loads((out / "fetch_dfn" / "fetch_summary.json").read_text())
    n = 80 + demo.N_PATTERNS  # the corpus and the pattern family
    n_dfn = sum(im.in_dfn for im in demo.all_images(n_patterns=demo.N_PATTERNS))
    assert coyo["complete"] and coyo["samples"]["success"] == n
    assert coyo["failures_by_reason"] == {r: 1 for _, r in demo.hostile_rows()}
    assert dfn["complete"] and dfn["samples"]["success"] == n_dfn == 54 + 214 and dfn["failures_by_reason"] == {}
    # shard + synthetic captions: every fetched image is a manifest row with its synthetic captions
    rows = pl.read_parquet(out / "manifest" / "samples" / "*.parquet")
    assert rows.height == n + n_dfn
    assert rows["syn_synthetic"].list.len().min() == 2
    assert (out / "tok.model").is_file()
    # training: the loss falls clearly at fixed resolution; native resolution gives finite losses
    fixed = json.loads((out / "train_fixed" / "summary.json").read_text())
    native = json.loads((out / "train_native" / "summary.json").read_text())
    assert fixed["status"] == "done" and fixed["loss_end"] < 0.5 * fixed["loss_start"]
    assert native["status"] == "done" and native["stage"] == "native"
    assert np.isfinite(native["loss_img_end"]) and np.isfinite(native["loss_text_end"])
    # export: the transformers folder holds the native run's encoder
    from aimv2train.eval.weights import load_weights
    from aimv2train.model.interop import load_encoder

    exported, trained = load_encoder(out / "export_hf"), load_weights(out / "train_native")
    assert exported.cfg.pos_embed == "sincos"
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in exported.state_dict().items())
    # probe (issue 7): on held-out patterns the demo-trained trunk beats chance (25 %) and a random trunk
    # widely. Measured (3 training seeds): train_fixed attentive 81-86 %, linear 79-84 %; random-init
    # trunks 55-61 % and 30-37 %. The margins asserted are about half the measured ones.
    p = json.loads((out / "probe" / "summary.json").read_text())
    assert p["chance_top1"] == 25.0 and p["images"] == {"train": 80, "val": 100}
    fixed_p, rand_p = p["train_fixed"], p["random_init"]
    assert fixed_p["attentive_top1"] >= 70.0 and fixed_p["linear_top1"] >= 65.0
    assert fixed_p["attentive_top1"] >= rand_p["attentive_top1"] + 10.0
    assert fixed_p["linear_top1"] >= rand_p["linear_top1"] + 25.0
    assert p["train_native"]["attentive_top1"] > p["random_init_native"]["attentive_top1"]
    assert "## Evaluation: frozen-trunk probes" in (out / "export_hf" / "README.md").read_text()
    before = snapshot(out)
    res = CliRunner().invoke(main, ["demo", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert res.output.count("already done") == 10
    assert snapshot(out) == before
