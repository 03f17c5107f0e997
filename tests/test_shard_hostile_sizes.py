"""Issue 20 points 7-8: a tar member is never read past its kind's size limit, and a header size that is not
a size ends that tar's index (the samples before it kept) instead of looping or failing the whole tar."""
import os
import resource
import sys
import tarfile

import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402

from aimv2data.manifest.build import build_manifest  # noqa: E402
from aimv2data.manifest.tarindex import index_tar  # noqa: E402

GIB = 1 << 30


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    return ti.tobuf(tarfile.USTAR_FORMAT)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + b"\0" * (-len(data) % 512)


def _sparse_tar(path, big_name: str) -> None:
    """k0 and k2 are plain samples; k1's `big_name` member claims 1 GiB, a hole on disk (the tar is ~12 KB)."""
    with open(path, "wb") as f:
        f.write(_member("k0.jpg", F.jpeg(32, 32, 0)) + _member("k0.txt", b"first"))
        if not big_name.endswith(".jpg"):
            f.write(_member("k1.jpg", F.jpeg(32, 32, 1)))
        f.write(_header(big_name, GIB))
        f.seek(f.tell() + GIB)                       # a hole: nothing written
        f.write(_member("k2.jpg", F.jpeg(32, 32, 2)) + _member("k2.txt", b"last") + b"\0" * 1024)
    assert os.stat(path).st_blocks * 512 < 1 << 20   # really sparse


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("big,reason", [("k1.txt", "caption_too_large"), ("k1.json", "json_too_large"),
                                        ("k1.jpg", "image_too_large")])
def test_a_member_claiming_a_gib_is_rejected_unread(tmp_path, big, reason):
    tar = tmp_path / "src" / "00000.tar"
    tar.parent.mkdir()
    _sparse_tar(tar, big)
    before = _maxrss_mib()
    r = build_manifest([str(tar)], tmp_path / "m", progress=False, idx="none")
    assert _maxrss_mib() - before < 256              # it read the 1 GiB body: peak memory grew by >= 1 GiB
    assert r["samples"] == 2 and r["per_reason"] == {reason: 1}
    rej = pq.read_table(next((tmp_path / "m").glob("rejects/*.parquet"))).to_pylist()
    assert [(x["key"], x["reason"]) for x in rej] == [("k1", reason)]
    assert str(GIB) in rej[0]["detail"] and "--max-" in rej[0]["detail"]
    caps = pq.read_table(next((tmp_path / "m").glob("samples/*.parquet")), columns=["caption"]).column(0)
    assert caps.to_pylist() == ["first", "last"]


def test_size_limits_are_flags(tmp_path):
    tar = tmp_path / "00000.tar"
    F.write_raw_tar(tar, [("a.jpg", F.jpeg(32, 32, 0)), ("a.txt", b"x" * 100), ("b.jpg", F.jpeg(32, 32, 1)),
                          ("b.json", b'{"caption": "' + b"y" * 100 + b'"}'), ("c.jpg", F.jpeg(32, 32, 2))])
    r = build_manifest([str(tar)], tmp_path / "m", progress=False, idx="none", max_caption_bytes=99,
                       max_image_bytes=100_000)
    assert r["samples"] == 1 and r["per_reason"] == {"caption_too_large": 2}
    r = build_manifest([str(tar)], tmp_path / "m2", progress=False, idx="none", max_image_bytes=10)
    assert r["samples"] == 0 and r["per_reason"] == {"image_too_large": 3}


def _pax(records: dict) -> bytes:
    return tarfile.TarInfo._create_pax_generic_header(records, tarfile.XHDTYPE, "utf-8")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("size", ["-1536", "12abc", " 12", "1e3", ""])
def test_a_pax_size_that_is_not_a_size_ends_the_index_keeping_what_came_before(tmp_path, size):
    tar = tmp_path / "00000.tar"
    body = F.jpeg(32, 32, 1)
    tar.write_bytes(_member("k0.jpg", F.jpeg(32, 32, 0)) + _member("k0.txt", b"kept")
                    + _pax({"size": size}) + _member("k1.jpg", body) + _member("k2.jpg", F.jpeg(32, 32, 2))
                    + b"\0" * 1024)
    idx = index_tar(str(tar))
    assert [s.key for s in idx.samples] == ["k0"]
    assert "not a size" in idx.tail_problem
    r = build_manifest([str(tar)], tmp_path / "m", progress=False, idx="none")
    assert r["samples"] == 1 and r["per_reason"] == {"tar_tail": 1}


@pytest.mark.timeout(60)
def test_a_negative_base256_size_is_a_damaged_header_not_a_jump_back(tmp_path):
    tar = tmp_path / "00000.tar"
    hdr = bytearray(_header("k1.jpg", 0))
    hdr[124:136] = b"\xff" * 12                      # base-256 -1
    hdr[148:156] = b" " * 8
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    tar.write_bytes(_member("k0.jpg", F.jpeg(32, 32, 0)) + bytes(hdr) + _member("k2.jpg", F.jpeg(32, 32, 2))
                    + b"\0" * 1024)
    idx = index_tar(str(tar))
    assert [s.key for s in idx.samples] == ["k0", "k2"]
