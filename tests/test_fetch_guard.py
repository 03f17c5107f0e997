"""`aimv2 fetch` treats url lists as hostile input: only http/https, never link-local (and by default never
private or loopback) addresses, redirects included; no credentials stored or printed; a re-encoded sample
says so; one writer per output, and a broken per-shard parquet is redone (issue 20 points 5, 6, 9, 18).

Three small fetches against a loopback server (module fixtures): the hostile list with
--allow-private-addresses, the same server without it, and a clean two-shard fetch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from _fetch_fixtures import read_shards, snapshot, status_table, summary
from click.testing import CliRunner

from aimv2data.fetch.summary import reason_class
from aimv2data.serve import LoopbackServer, small_jpeg
from cli.main import main

FAST = ["--processes", "1", "--download-threads", "4", "--timeout", "10", "--source", "parquet", "--caption-col", ""]
SECRETS = ("s3cret", "hunter2", "alice", "bob")


def run_fetch(*args):
    return CliRunner().invoke(main, ["fetch", *map(str, args)], catch_exceptions=False)


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buf, "PNG")
    return buf.getvalue()


def url_list(path: Path, urls: list[str]) -> Path:
    pl.DataFrame({"url": urls}).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    secret = root / "secret.jpg"       # a local file a url list must never get into a shard
    secret.write_bytes(small_jpeg(7))
    with LoopbackServer(routes={"/a.jpg": small_jpeg(5), "/p.png": png_bytes()}) as srv:
        port = srv.port
        srv.routes.update({
            "/to-file.jpg": (302, {"Location": f"file://{secret}"}, b""),
            "/to-ftp.jpg": (302, {"Location": f"ftp://127.0.0.1:{port}/a.jpg"}, b""),
            "/to-metadata.jpg": (302, {"Location": "http://169.254.169.254/latest/meta-data/iam"}, b""),
            "/to-a.jpg": (301, {"Location": "/a.jpg"}, b""),
            "/to-creds.png": (302, {"Location": f"http://bob:hunter2@127.0.0.1:{port}/p.png"}, b""),
        })
        yield srv, root, secret


HOSTILE_ROWS = {   # url (given the server) -> expected reason (None: fetched)
    "HTTP://{host}/a.jpg": None,                              # any case of the scheme
    "file://{secret}": "refused_scheme",
    "FILE://{secret}": "refused_scheme",
    "http://{host}/to-file.jpg": "refused_scheme",            # a redirect to file://
    "http://{host}/to-ftp.jpg": "refused_scheme",             # a redirect to ftp://
    "http://169.254.169.254/latest/meta-data/": "refused_link_local",
    "http://[fe80::1]/x.jpg": "refused_link_local",
    "http://{host}/to-metadata.jpg": "refused_link_local",    # a redirect to a credential service
    "http://{host}/to-a.jpg": None,
    "http://alice:s3cret@{host}/p.png": None,
    "http://{host}/to-creds.png": None,
    "http://{host}/a.jpg?X-Amz-Signature=abc123&X-Amz-Expires=60": None,
}


@pytest.fixture(scope="module")
def hostile_run(server, tmp_path_factory):
    srv, root, secret = server
    host = f"127.0.0.1:{srv.port}"
    urls = [u.format(host=host, secret=secret) for u in HOSTILE_ROWS]
    lst = url_list(root / "hostile.parquet", urls)
    out = tmp_path_factory.mktemp("fetch") / "hostile"
    res = run_fetch("--url-list", lst, "--output", out, "--allow-private-addresses", "--retries", 2, *FAST)
    assert res.exit_code == 0, res.output
    rows = {r["url"]: r for r in status_table(out).iter_rows(named=True)}
    return out, res.output, dict(zip(urls, HOSTILE_ROWS.values())), rows


def _row(rows: dict, url: str) -> dict:
    """The status row of a given url (urls are stored without userinfo)."""
    from aimv2data.urls import strip_userinfo

    return rows[strip_userinfo(url)]


# -- point 5: what fetch connects to --------------------------------------------------------------------
def test_only_http_and_https_are_fetched_redirects_included(hostile_run, server):
    out, _, expected, rows = hostile_run
    _, _, secret = server
    stored = [s["jpg"] for s in read_shards(out).values()]
    assert secret.read_bytes() not in stored            # the local file is not in any shard
    assert len(stored) == sum(v is None for v in expected.values())
    for url, reason in expected.items():
        r = _row(rows, url)
        if reason is None:
            assert r["status"] == "success", (url, r["error_message"])
        else:
            assert r["status"] == "failed_to_download" and reason_class(r["error_message"]) == reason, (url, r)


def test_refusals_are_counted_by_reason_and_never_retried(hostile_run, server):
    out, printed, expected, _ = hostile_run
    srv, _, _ = server
    s = summary(out)
    for reason in ("refused_scheme", "refused_link_local"):
        assert s["failures_by_reason"][reason] == sum(v == reason for v in expected.values())
        assert reason in printed
    # --retries 2: a time-out would be asked three times; a refused redirect is asked once
    assert srv.hits["/to-ftp.jpg"] == srv.hits["/to-file.jpg"] == srv.hits["/to-metadata.jpg"] == 1


def test_final_url_of_a_redirect_is_recorded(hostile_run, server):
    out, _, _, rows = hostile_run
    srv, _, _ = server
    by_url = {s["json"]["url"]: s["json"] for s in read_shards(out).values()}
    assert by_url[srv.url("/to-a.jpg")]["final_url"] == srv.url("/a.jpg")
    assert by_url[srv.url("/to-creds.png")]["final_url"] == srv.url("/p.png")    # userinfo stripped
    assert rows[srv.url("/to-a.jpg")]["final_url"] == srv.url("/a.jpg")          # the parquet too


def test_private_and_loopback_addresses_are_refused_by_default(server, tmp_path):
    srv, root, _ = server
    before = srv.hits.copy()
    urls = [srv.url("/a.jpg"), f"http://localhost:{srv.port}/p.png", srv.url("/to-a.jpg")]
    out = tmp_path / "out"
    res = run_fetch("--url-list", url_list(tmp_path / "l.parquet", urls), "--output", out, *FAST)
    assert res.exit_code == 0, res.output
    assert summary(out)["failures_by_reason"] == {"refused_private": 3}
    assert "--allow-private-addresses" in status_table(out)["error_message"][0]
    assert srv.hits == before                            # never connected


def test_address_policy():
    from aimv2data.fetch.guard import address_refusal

    for ip in ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254"):
        assert "link-local" in address_refusal(ip, allow_private=True)
    for ip in ("127.0.0.1", "10.1.2.3", "192.168.0.1", "172.16.0.1", "::1", "fd00:ec2::254", "0.0.0.0"):
        assert address_refusal(ip, allow_private=False) and address_refusal(ip, allow_private=True) is None
    assert address_refusal("93.184.216.34", allow_private=False) is None


# -- point 6: credentials in urls -----------------------------------------------------------------------
def test_credentials_in_urls_are_never_stored_or_printed(hostile_run, server):
    out, printed, _, rows = hostile_run
    srv, _, _ = server
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert not any(s.encode() in data for s in SECRETS), p
    assert not any(s in printed for s in SECRETS)
    assert srv.url("/p.png") in rows                     # the url, without its userinfo
    signed = srv.url("/a.jpg") + "?X-Amz-Signature=abc123&X-Amz-Expires=60"
    assert signed in rows                                # the query string is kept (docs/fetch.md)


def test_manifest_strips_userinfo_of_older_fetches(tmp_path):
    import _shard_fixtures as F

    shards = tmp_path / "shards"
    shards.mkdir()
    case = F.Case("c", "jpg", F.jpeg(), "keep", meta={"url": "https://alice:s3cret@cdn.example/a.jpg?v=2"})
    F.write_img2dataset_tar(shards / "00000.tar", [case])
    res = CliRunner().invoke(main, ["shard", str(shards), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    urls = pl.read_parquet(tmp_path / "m" / "samples").get_column("url").to_list()
    assert urls == ["https://cdn.example/a.jpg?v=2"]


# -- point 18: re-encoded samples are marked ------------------------------------------------------------
def test_reencoded_samples_carry_the_stored_bytes_hash(hostile_run, server, tmp_path):
    out, _, _, rows = hostile_run
    srv, _, _ = server
    by_url = {s["json"]["url"]: s for s in read_shards(out).values()}
    jpg, png = by_url[srv.url("/to-a.jpg")], by_url[srv.url("/p.png")]
    assert jpg["json"]["reencoded"] is False
    assert jpg["json"]["stored_sha256"] == jpg["json"]["sha256"] == hashlib.sha256(jpg["jpg"]).hexdigest()
    assert png["json"]["reencoded"] is True
    assert png["json"]["sha256"] == hashlib.sha256(png_bytes()).hexdigest()       # as downloaded
    assert png["json"]["stored_sha256"] == hashlib.sha256(png["jpg"]).hexdigest()  # as stored
    assert rows[srv.url("/p.png")]["reencoded"] is True and rows[srv.url("/p.png")]["stored_sha256"]

    res = CliRunner().invoke(main, ["shard", str(out), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    m = pl.read_parquet(tmp_path / "m" / "samples").sort("url")
    assert json.loads((tmp_path / "m" / "_manifest.json").read_text())["schema_version"] == "1.1"
    by = {r["url"]: r for r in m.iter_rows(named=True)}
    assert by[srv.url("/p.png")]["reencoded"] is True
    assert by[srv.url("/p.png")]["stored_sha256"] == png["json"]["stored_sha256"]
    assert by[srv.url("/to-a.jpg")]["reencoded"] is False
    assert by[srv.url("/to-a.jpg")]["stored_sha256"] == by[srv.url("/to-a.jpg")]["sha256"]


# -- point 9: one writer per output; a broken parquet is redone ------------------------------------------
@pytest.fixture(scope="module")
def clean_run(server, tmp_path_factory):
    srv, root, _ = server
    urls = [srv.url("/a.jpg") + f"?n={i}" for i in range(4)]
    lst = url_list(root / "clean.parquet", urls)
    out = tmp_path_factory.mktemp("fetch") / "clean"
    args = ["--url-list", lst, "--output", out, "--allow-private-addresses", "--shard-size", 2, *FAST]
    res = run_fetch(*args)
    assert res.exit_code == 0, res.output
    return out, args


def test_a_second_fetch_into_a_locked_output_is_refused_naming_the_holder(clean_run, tmp_path):
    from aimv2data.manifest.lock import output_lock

    out, args = clean_run
    before = snapshot(out)
    with output_lock(out, tool="aimv2 fetch", argv=["aimv2", "fetch", "--output", str(out)]):
        res = run_fetch(*args)
    assert res.exit_code == 1, res.output
    assert "being written by another `aimv2 fetch` run" in res.output and f"pid {os.getpid()}" in res.output
    assert snapshot(out) == before
    new = tmp_path / "new"          # a new output: the refusal comes before anything but the lock is written
    with output_lock(new, tool="aimv2 fetch"):
        res = run_fetch(*[str(new) if a == out else a for a in args])
    assert res.exit_code == 1 and "being written by another" in res.output, res.output
    assert [p.name for p in new.iterdir()] == [".lock"]


def test_a_rerun_redoes_a_shard_whose_parquet_is_unreadable(clean_run, server, tmp_path):
    srv, _, _ = server
    src, args = clean_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    broken = out / "00000.parquet"
    broken.write_bytes(b"\0" * broken.stat().st_size)        # two writers' interleaved bytes, say
    before = srv.hits["/a.jpg"]
    res = run_fetch(*[str(out) if a == src else a for a in args])
    assert res.exit_code == 0, res.output
    assert pq.read_table(broken).num_rows == 2 and summary(out)["complete"] is True
    assert srv.hits["/a.jpg"] == before + 2                  # shard 0 again, shard 1 kept
