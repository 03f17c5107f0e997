"""`aimv2 fetch` against a loopback server serving the demo corpus and hostile bodies.

One COYO run and one DFN run (module fixtures) back most tests; bad-input tests stop before any
download. The kill/resume test is marked slow.
"""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from _fetch_fixtures import (decode, read_shards, shard_files, snapshot, start_fetch, status_table, summary,
                             tar_keys, wait_mid_shard)
from _timeouts import scaled
from click.testing import CliRunner

from aimv2data import demo_corpus as demo
from aimv2data.fetch import FetchError
from aimv2data.fetch.input import in_index, load_dfn_index, uid_pairs
from aimv2data.fetch.resize import NativeResizer, inspect_header, jpeg_is_complete, with_orientation
from aimv2data.fetch.summary import busy_seconds, reason_class
from aimv2data.serve import HOSTILE, LoopbackServer, bomb_png
from cli.main import main

REPO = Path(__file__).resolve().parents[1]
FAST = ["--processes", "1", "--download-threads", "8", "--timeout", "2"]


def run_fetch(*args):
    """The loopback server is a private address: fetch refuses it unless told (tests/test_fetch_guard.py)."""
    return CliRunner().invoke(main, ["fetch", "--allow-private-addresses", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo corpus on loopback, its url lists, plus a second COYO list holding the slow route."""
    root = tmp_path_factory.mktemp("corpus")
    demo.write_corpus(root)
    bomb_png()  # built once up front: on a loaded machine its build (1-5 s) outlasts --timeout 2
    with LoopbackServer(directory=root / "images", slow_s=6) as srv:
        lists = demo.write_url_lists(root, srv.base_url)
        slow = root / "coyo_slow.parquet"
        pl.DataFrame({"id": [3_000_000], "url": [srv.url("/hostile/slow.jpg")], "text": ["stalls"],
                      "width": [96], "height": [64]}).write_parquet(slow)
        yield srv, root, {**lists, "coyo_slow": slow}


@pytest.fixture(scope="module")
def coyo_run(served, tmp_path_factory):
    srv, root, lists = served
    out = tmp_path_factory.mktemp("fetch") / "coyo"
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--url-list", lists["coyo_slow"],
                    "--output", out, "--shard-size", 32, *FAST)
    assert res.exit_code == 0, res.output
    return out, res.output


@pytest.fixture(scope="module")
def dfn_run(served, tmp_path_factory):
    """DFN pool with one in-index row whose listed sha256 is wrong (the image 'changed')."""
    srv, root, lists = served
    changed = next(im for im in demo.corpus() if im.in_dfn and im.kind == "generated")
    pool = pl.read_parquet(lists["dfn_pool"]).with_columns(
        pl.when(pl.col("uid") == changed.uid).then(pl.lit("0" * 64)).otherwise(pl.col("sha256")).alias("sha256"))
    pool_path = root / "dfn_pool_changed.parquet"
    pool.write_parquet(pool_path)
    before = srv.hits.copy()
    out = tmp_path_factory.mktemp("fetch") / "dfn"
    res = run_fetch("--source", "dfn", "--url-list", pool_path, "--dfn-index", lists["dfn_index"],
                    "--output", out, "--shard-size", 20, *FAST)
    assert res.exit_code == 0, res.output
    return out, changed, srv.hits - before


# -- COYO: every good image, at native resolution, re-encoded only when needed ------------------
def test_coyo_fetches_every_good_image_at_native_size(coyo_run):
    out, _ = coyo_run
    samples = read_shards(out)
    by_url = {s["json"]["url"].rsplit("/", 1)[1]: s for s in samples.values()}
    images = demo.corpus()
    assert len(samples) == len(images)  # hostile rows leave no image in any tar
    for im in images:
        s = by_url[im.name]
        j = s["json"]
        assert j["status"] == "success"
        assert (j["width"], j["height"]) == (im.width, im.height) == (j["original_width"], j["original_height"])
        assert (j["id"], j["source"], j["src_width"], j["src_height"]) == (im.id, "coyo", im.width, im.height)
        assert s["txt"] == im.caption
        assert j["sha256"] == im.sha256  # hash of the bytes as downloaded
        p = inspect_header(s["jpg"])
        assert p["format"] == "JPEG" and not p["progressive"], im.name
        assert (p["width"], p["height"], p["orientation"]) == (im.width, im.height, im.orientation), im.name


def test_baseline_jpegs_are_stored_byte_for_byte_others_reencoded_faithfully(coyo_run):
    out, _ = coyo_run
    by_url = {s["json"]["url"].rsplit("/", 1)[1]: s for s in read_shards(out).values()}
    from PIL import Image

    kept = reencoded = 0
    for im in demo.corpus():
        stored = by_url[im.name]["jpg"]
        if im.format == "jpeg" and not im.progressive:
            assert stored == im.data, im.name
            kept += 1
            continue
        assert stored != im.data
        a = np.asarray(decode(stored).convert("RGB"), np.float32)
        src = decode(im.data)
        if src.mode == "RGBA":  # composited on white, as img2dataset does
            src = Image.alpha_composite(Image.new("RGBA", src.size, (255, 255, 255, 255)), src)
        b = np.asarray(src.convert("RGB"), np.float32)
        assert a.shape == b.shape
        assert np.abs(a - b).mean() < 6.0, im.name  # quality 95: close to the source (1.9 on average), not garbled
        reencoded += 1
    baseline = sum(im.format == "jpeg" and not im.progressive for im in demo.corpus())
    assert (kept, reencoded) == (baseline, 80 - baseline) and kept > 30 and reencoded > 20


def test_exif_orientation_survives_reencoding():
    """A progressive JPEG with orientation 6 is re-encoded to baseline and keeps orientation 6."""
    from PIL import Image, ImageOps

    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, progressive=True, exif=exif.tobytes())
    r = NativeResizer(image_size=2048, resize_mode="keep_ratio_largest", resize_only_if_bigger=True,
                      encode_format="jpg", skip_reencode=True)
    data, w, h, ow, oh, err = r(io.BytesIO(buf.getvalue()))
    assert err is None and (w, h, ow, oh) == (80, 40, 80, 40)
    assert inspect_header(data) == {"format": "JPEG", "width": 80, "height": 40, "mode": "RGB", "progressive": False,
                           "orientation": 6}
    shown = ImageOps.exif_transpose(decode(data))
    assert shown.size == (40, 80)


def test_keys_are_unique_and_shards_hold_at_most_shard_size(coyo_run):
    out, _ = coyo_run
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 80
    s = summary(out)
    # img2dataset shards each input file on its own: 88 rows -> 3 shards of <= 32, the slow-route list -> 1
    assert s["shards"] == {"expected": 4, "done": 4, "missing": []}
    assert sorted(p.name for p in out.glob("*.tar")) == [f"0000{i}.tar" for i in range(4)]
    for tar in out.glob("*.tar"):
        assert len([k for k in tar_keys(out) if k.startswith(tar.stem)]) <= 32


def test_summary_counts_failures_by_reason(coyo_run):
    out, printed = coyo_run
    s = summary(out)
    expected = {reason: 1 for path, reason in HOSTILE.items()}
    assert s["complete"] is True
    assert s["samples"]["attempted"] == 89 and s["samples"]["success"] == 80
    assert s["failures_by_reason"] == expected
    assert s["samples_per_second"] > 0
    assert "failures by reason" in printed and "80 / 89" in printed


def test_img2dataset_chatter_is_in_the_log_our_progress_on_screen(coyo_run):
    """Issue 23 point 10: img2dataset's own lines ("check your bandwidth speed (with bwm-ng)", per-worker speed
    lines, its tqdm) go to DIR/_logs/img2dataset.log, named in the summary; the screen shows our progress line
    (shards done, samples ok / failed) and the summary."""
    out, printed = coyo_run
    log = (out / "_logs" / "img2dataset.log").read_text()
    assert "bwm-ng" in log and "worker  - success" in log and "Sharding file number" in log
    assert "bwm-ng" not in printed and "Sharding file number" not in printed and "worker  -" not in printed
    assert "4/4 shards" in printed and "80 ok, 9 failed" in printed
    assert summary(out)["log"] == str((out / "_logs" / "img2dataset.log").resolve())
    assert "img2dataset's own output" in printed


def _failed_row(out: Path, route: str) -> dict:
    rows = status_table(out).filter(pl.col("url").str.ends_with(route)).to_dicts()
    assert len(rows) == 1, route
    return rows[0]


@pytest.mark.parametrize("route,status,message", [
    ("/hostile/404.jpg", "failed_to_download", "HTTP Error 404: Not Found"),
    ("/hostile/500.jpg", "failed_to_download", "HTTP Error 500: Internal Server Error"),
    ("/hostile/slow.jpg", "failed_to_download", "timed out"),
    ("/hostile/html.jpg", "failed_to_resize", "HTML/XML page instead of an image"),
    ("/hostile/empty.jpg", "failed_to_resize", "empty body"),
    ("/hostile/truncated.jpg", "failed_to_resize", "truncated JPEG (no end-of-image marker)"),
    ("/hostile/corrupt.jpg", "failed_to_resize", "undecodable image bytes"),
    ("/hostile/bomb.png", "failed_to_resize", "image too large"),
    ("/hostile/noai.jpg", "failed_to_download", "Use of image disallowed by X-Robots-Tag directive"),
])
def test_each_bad_body_is_skipped_counted_and_named(coyo_run, route, status, message):
    out, _ = coyo_run
    row = _failed_row(out, route)
    assert row["status"] == status
    assert message in row["error_message"]
    assert reason_class(row["error_message"]) == HOSTILE[route]
    assert summary(out)["failure_examples"][HOSTILE[route]][0]["key"] == row["key"]


def test_decompression_bomb_is_refused_before_decoding():
    """In a fresh process: refusing the 20000x20000 PNG adds nothing near its 1.2 GB of pixels to the
    peak memory (peak after the call minus resident size before it)."""
    # VmHWM is the peak of this process's own address space; ru_maxrss is not: Linux carries it over
    # fork+exec from the parent (pytest, several hundred MB after the model tests), which hid the peak.
    code = (
        "import io, os\n"
        "def mb(field):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(field))\n"
        "    return int(line.split()[1]) // 1024\n"
        "from aimv2data.serve import bomb_png\n"
        "from aimv2data.fetch.resize import NativeResizer\n"
        "r = NativeResizer(image_size=2048, resize_mode='keep_ratio_largest', resize_only_if_bigger=True,"
        " encode_format='jpg', skip_reencode=True, max_image_area=178956970)\n"
        "data = bomb_png()\n"
        "rss = mb('VmRSS:')\n"
        "out = r(io.BytesIO(data))\n"
        "print(out[5]); print(mb('VmHWM:') - rss)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    assert res.returncode == 0, res.stderr
    err, growth_mb = res.stdout.strip().splitlines()[-2:]
    assert err.startswith("image too large")
    assert int(growth_mb) < 300, f"peak memory grew by {growth_mb} MB: the bomb was decoded"


# -- resume: a finished job is left alone --------------------------------------------------------
def test_second_run_changes_nothing_and_downloads_nothing(served, coyo_run):
    srv, _, lists = served
    out, _ = coyo_run
    before, hits = snapshot(out), srv.hits.copy()
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--url-list", lists["coyo_slow"],
                    "--output", out, "--shard-size", 32, *FAST)
    assert res.exit_code == 0, res.output
    assert "nothing to fetch" in res.output
    assert snapshot(out) == before  # same bytes, same mtimes, no new files
    assert srv.hits == hits


def test_rerun_with_other_settings_is_refused_untouched(served, coyo_run):
    _, _, lists = served
    out, _ = coyo_run
    before = snapshot(out)
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--url-list", lists["coyo_slow"],
                    "--output", out, "--shard-size", 16, *FAST)
    assert res.exit_code == 1
    assert "other settings" in res.output and "shard_size: 32 -> 16" in res.output
    assert snapshot(out) == before


def test_rerun_with_other_rows_is_refused(served, coyo_run):
    _, _, lists = served
    out, _ = coyo_run
    before = snapshot(out)
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--output", out, "--shard-size", 32, *FAST)
    assert res.exit_code == 1 and "the rows differ" in res.output
    assert snapshot(out) == before


# -- DFN: exactly the indexed subset, filtered before any download -------------------------------
def test_dfn_fetches_exactly_the_indexed_subset(dfn_run):
    out, changed, hits = dfn_run
    images = demo.corpus()
    samples = read_shards(out)
    want = {im.uid for im in images if im.in_dfn} - {changed.uid}
    assert {s["json"]["uid"] for s in samples.values()} == want
    for s in samples.values():
        im = next(i for i in images if i.uid == s["json"]["uid"])
        assert s["json"]["sha256"] == im.sha256 and s["json"]["source"] == "dfn"
        assert (s["json"]["width"], s["json"]["height"]) == (im.width, im.height)
    # never requested: pool rows outside the index
    requested = {p.lstrip("/") for p in hits}
    assert requested == {im.name for im in images if im.in_dfn}
    s = summary(out)
    assert s["input"]["not_in_index"] == sum(not im.in_dfn for im in images) == 26
    assert s["failures_by_reason"] == {"hash_mismatch": 1}


def test_max_side_downscales_large_images_keeps_aspect_never_upscales(served, tmp_path):
    _, _, lists = served
    out = tmp_path / "small"
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--output", out, "--limit", 30,
                    "--max-side", 256, "--shard-size", 30, *FAST)
    assert res.exit_code == 0, res.output
    by_url = {s["json"]["url"].rsplit("/", 1)[1]: s for s in read_shards(out).values()}
    assert len(by_url) == 30
    for im in demo.corpus()[:30]:
        s = by_url[im.name]
        w, h = s["json"]["width"], s["json"]["height"]
        assert decode(s["jpg"]).size == (w, h)
        if max(im.width, im.height) <= 256:
            assert (w, h) == (im.width, im.height)
            if im.format == "jpeg" and not im.progressive:
                assert s["jpg"] == im.data
        else:
            scale = 256 / max(im.width, im.height)
            assert max(w, h) == 256
            assert abs(w - im.width * scale) <= 1 and abs(h - im.height * scale) <= 1, im.name


def test_generic_parquet_with_named_columns_and_no_captions(served, tmp_path):
    srv, _, _ = served
    images = demo.corpus()[:6]
    p = tmp_path / "mine.parquet"
    pl.DataFrame({"image_url": [srv.url(im.name) for im in images], "alt": ["unused"] * 6}).write_parquet(p)
    out = tmp_path / "generic"
    res = run_fetch("--source", "parquet", "--url-list", p, "--url-col", "image_url", "--caption-col", "",
                    "--output", out, *FAST)
    assert res.exit_code == 0, res.output
    samples = read_shards(out)
    assert sorted(s["json"]["url"] for s in samples.values()) == sorted(srv.url(im.name) for im in images)
    assert all("txt" not in s and s["json"]["source"] == "parquet" for s in samples.values())


def test_keep_progressive_keeps_the_original_bytes():
    prog = next(im for im in demo.corpus() if im.progressive)
    kw = dict(image_size=2048, resize_mode="keep_ratio_largest", resize_only_if_bigger=True, encode_format="jpg",
              skip_reencode=True)
    assert NativeResizer(**kw, keep_progressive=True)(io.BytesIO(prog.data))[0] == prog.data
    assert NativeResizer(**kw)(io.BytesIO(prog.data))[0] != prog.data


# -- bad input: clear errors, nothing touched -----------------------------------------------------
def _assert_untouched(res, out: Path, *needles):
    assert res.exit_code == 1, res.output
    for n in needles:
        assert n in res.output, (n, res.output)
    assert not out.exists()


def test_missing_url_list(tmp_path):
    out = tmp_path / "out"
    res = run_fetch("--source", "coyo", "--url-list", tmp_path / "nope.parquet", "--output", out)
    _assert_untouched(res, out, "--url-list", "nope.parquet", "does not exist")


def test_unreadable_url_list(tmp_path):
    bad = tmp_path / "list.parquet"
    bad.write_bytes(b"id,url,text\n1,http://x/y.jpg,hello\n")  # a CSV in disguise
    out = tmp_path / "out"
    res = run_fetch("--source", "coyo", "--url-list", bad, "--output", out)
    _assert_untouched(res, out, "cannot read url list", "list.parquet", "parquet")
    (tmp_path / "empty_dir").mkdir()
    res = run_fetch("--source", "coyo", "--url-list", tmp_path / "empty_dir", "--output", out)
    _assert_untouched(res, out, "holds no *.parquet files")


def test_missing_column_is_named_with_the_columns_present(tmp_path):
    p = tmp_path / "coyo.parquet"
    pl.DataFrame({"id": [1], "url": ["http://127.0.0.1:9/a.jpg"], "caption": ["x"]}).write_parquet(p)
    out = tmp_path / "out"
    res = run_fetch("--source", "coyo", "--url-list", p, "--output", out)
    _assert_untouched(res, out, "no column 'text'", "columns present: id, url, caption")
    res = run_fetch("--source", "parquet", "--url-list", p, "--url-col", "image_url", "--output", out)
    _assert_untouched(res, out, "no column 'image_url'", "columns present: id, url, caption")


@pytest.mark.parametrize("index,needle", [
    (np.zeros((4, 2), np.uint64), "has dtype uint64"),
    (np.zeros(4, dtype="i8,i8"), "has dtype [('f0', '<i8'), ('f1', '<i8')]"),
    (np.array([(5, 0), (1, 0)], dtype="u8,u8"), "is not sorted"),
])
def test_dfn_index_of_the_wrong_dtype_or_order(served, tmp_path, index, needle):
    _, _, lists = served
    idx = tmp_path / "index.npy"
    np.save(idx, index)
    out = tmp_path / "out"
    res = run_fetch("--source", "dfn", "--url-list", lists["dfn_pool"], "--dfn-index", idx, "--output", out)
    _assert_untouched(res, out, "--dfn-index", needle)
    if "dtype" in needle:
        assert "[('f0', '<u8'), ('f1', '<u8')]" in res.output  # says what was expected


def test_dfn_needs_an_index_and_an_index_that_selects_something(served, tmp_path):
    _, _, lists = served
    out = tmp_path / "out"
    res = run_fetch("--source", "dfn", "--url-list", lists["dfn_pool"], "--output", out)
    _assert_untouched(res, out, "--source dfn needs --dfn-index")
    idx = tmp_path / "other.npy"
    np.save(idx, np.sort(uid_pairs(["f" * 32])))
    res = run_fetch("--source", "dfn", "--url-list", lists["dfn_pool"], "--dfn-index", idx, "--output", out)
    _assert_untouched(res, out, "nothing to fetch", "'not_in_index': 80")


def test_output_directory_holding_something_else_is_refused_untouched(served, tmp_path):
    _, _, lists = served
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    before = snapshot(out)
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--output", out)
    assert res.exit_code == 1
    assert "not an aimv2 fetch output" in res.output and "holiday.jpg" in res.output
    assert snapshot(out) == before
    f = tmp_path / "a_file"
    f.write_text("x")
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--output", f)
    assert res.exit_code == 1 and "is a file" in res.output


def test_distributor_that_is_not_installed(served, tmp_path):
    _, _, lists = served
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed here")
    out = tmp_path / "out"
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--output", out, "--distributor", "ray")
    _assert_untouched(res, out, "needs the `ray` package")


# -- small pieces ------------------------------------------------------------------------------
def test_uid_halves_and_index_membership():
    uid = "0123456789abcdeffedcba9876543210"
    rec = uid_pairs([uid])
    assert rec.dtype == np.dtype("u8,u8")
    assert (int(rec["f0"][0]), int(rec["f1"][0])) == (0x0123456789ABCDEF, 0xFEDCBA9876543210)
    rng = np.random.default_rng(0)
    uids = [rng.bytes(16).hex() for _ in range(2000)]
    members = set(uids[::3])
    index = np.sort(uid_pairs(sorted(members)))
    assert in_index(index, uids).tolist() == [u in members for u in uids]


def test_index_is_memory_mapped_not_loaded(tmp_path):
    p = tmp_path / "i.npy"
    np.save(p, np.sort(uid_pairs([f"{i:032x}" for i in range(1000)])))
    idx = load_dfn_index(p)
    assert isinstance(idx, np.memmap)
    with pytest.raises(FetchError, match="does not exist"):
        load_dfn_index(tmp_path / "missing.npy")


def test_jpeg_completeness_ignores_the_eoi_of_an_exif_thumbnail():
    jpeg = demo.corpus()[0].data
    assert jpeg_is_complete(jpeg)
    assert not jpeg_is_complete(jpeg[: len(jpeg) // 2])
    # an APP1 segment that contains FF D9 (as an embedded thumbnail does), then a cut-off scan
    app1 = b"\xff\xe1" + (2 + 8).to_bytes(2, "big") + b"Exif\0\0\xff\xd9"
    spliced = jpeg[:2] + app1 + jpeg[2:]
    assert jpeg_is_complete(spliced)
    assert not jpeg_is_complete(spliced[: len(spliced) - 1000])


def test_orientation_segment_is_read_back_and_keeps_pixels():
    jpeg = demo.corpus()[0].data
    tagged = with_orientation(jpeg, 8)
    assert inspect_header(tagged)["orientation"] == 8
    assert np.array_equal(np.asarray(decode(tagged)), np.asarray(decode(jpeg)))


def test_busy_seconds_is_the_union_of_shard_spans():
    assert busy_seconds([(0, 2), (1, 3), (10, 11)]) == 4
    assert busy_seconds([]) == 0


# -- a run killed mid-shard completes on rerun, nothing duplicated --------------------------------
def _wait_group_gone(pgid):
    for _ in range(200):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_without_duplicates(served, tmp_path):
    srv, _, lists = served
    out = tmp_path / "killed"
    srv.delay = 0.1  # ~0.5 s per 10-image shard with 2 threads
    try:
        # 1. Ctrl-C (SIGINT to the process group, as a terminal sends it)
        proc = start_fetch(lists["coyo"], out)
        wait_mid_shard(proc, out, 1)
        os.killpg(proc.pid, signal.SIGINT)
        text = proc.communicate(timeout=scaled(120))[0].decode()
        assert proc.returncode == 130, text
        assert "interrupted: rerun the same command to resume" in text
        assert "bwm-ng" not in text and "bwm-ng" in (out / "_logs" / "img2dataset.log").read_text()
        assert summary(out)["complete"] is False
        # 2. SIGKILL of the whole group (a node or container dying)
        proc = start_fetch(lists["coyo"], out)
        wait_mid_shard(proc, out, len(shard_files(out)[0]) + 1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=scaled(60))
        _wait_group_gone(proc.pid)
    finally:
        srv.delay = 0.0
    done, tars = shard_files(out)
    assert tars - done, "expected a partial tar without its _stats.json"
    assert not (out / "fetch_summary.json").exists()  # a run in progress never leaves a summary
    kept = {n: snapshot(out)[f"{n}.tar"] for n in done}
    # 3. rerun: completes, finished shards untouched, partial ones redone, no key twice
    res = run_fetch("--source", "coyo", "--url-list", lists["coyo"], "--output", out, "--shard-size", 10,
                    "--processes", "1", "--download-threads", "2", "--timeout", "5")
    assert res.exit_code == 0, res.output
    snap = snapshot(out)
    assert all(snap[f"{n}.tar"] == kept[n] for n in kept)
    keys = tar_keys(out)
    assert len(keys) == len(set(keys)) == 80
    urls = {s["json"]["url"].rsplit("/", 1)[1] for s in read_shards(out).values()}
    assert urls == {im.name for im in demo.corpus()}
    s = summary(out)
    assert s["complete"] and s["samples"]["success"] == 80 and s["samples"]["attempted"] == 88
    assert not (out / "_tmp").exists()
