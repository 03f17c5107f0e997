"""Tar member offsets are exact for every header flavour; broken tars are indexed as far as they go."""
import gzip
import io
import os
import sys
import tarfile

import numpy as np
import pytest

from aimv2data.manifest.tarindex import TarUnreadable, index_tar, split_name, write_dali_index

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402

LONG = "d/" + "x" * 120 + "/k"     # > 100 chars: GNU longname / pax path records before the header


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_offsets_point_at_member_bytes(tmp_path, fmt):
    members = [("000.jpg", F.jpeg(40, 30, 1)), ("000.txt", b"cap"), ("000.json", b"{}"),
               ("001.png", F.encode(F.picture(20, 10), "PNG")), ("001.txt", b"")]
    if fmt != tarfile.USTAR_FORMAT:
        members += [(LONG + ".jpg", F.jpeg(30, 30, 2)), ("ünï/çødé.webp", F.encode(F.picture(8, 8), "WEBP"))]
    path = tmp_path / "a.tar"
    F.write_raw_tar(path, members, fmt)
    idx = index_tar(str(path))
    got = {m.name: m for s in idx.samples for m in s.members.values()}
    assert sorted(got) == sorted(n for n, _ in members)
    with open(path, "rb") as f:
        for name, data in members:
            m = got[name]
            f.seek(m.offset)
            assert f.read(m.size) == data, name
            assert m.offset % 512 == 0          # DALI requires block-aligned data offsets
    assert not idx.truncated and idx.tail_problem is None


def test_ustar_prefix_names_and_non_files(tmp_path):
    path = tmp_path / "a.tar"
    deep = "p" * 90 + "/" + "q" * 90 + "/000.jpg"           # > 100 chars: ustar splits it into prefix/name
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in [(deep, F.jpeg(20, 20)), ("._000.jpg", b"mac junk"), ("001.txt", b"t")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        ln = tarfile.TarInfo("link.jpg")
        ln.type, ln.linkname = tarfile.SYMTYPE, "001.txt"
        tf.addfile(ln)
    idx = index_tar(str(path))
    assert [s.key for s in idx.samples] == [deep[:-4], "001"]
    assert idx.ignored == 3                                  # hidden file, directory, symlink
    with tarfile.open(path) as tf, open(path, "rb") as f:
        m = idx.samples[0].members["jpg"]
        f.seek(m.offset)
        assert f.read(m.size) == tf.extractfile(deep).read()


def test_damaged_header_mid_tar_resynchronises_on_the_next_header(tmp_path):
    good = tmp_path / "good.tar"
    F.good_tar(good, 6)
    idx = index_tar(str(good))
    data = bytearray(good.read_bytes())
    victim = idx.samples[4].members["jpg"]
    hdr = victim.offset - 512                                # the member's own header block
    data[hdr:hdr + 20] = b"X" * 20                           # its checksum no longer matches
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    t = index_tar(str(bad))
    with_image = [s.key for s in t.samples if s.image()[1] is not None]
    assert with_image == [s.key for s in idx.samples[:4] + idx.samples[5:]]  # only the victim's image is lost
    assert t.tail_problem is None and len(t.damaged) == 1
    assert "checksum" in t.damaged[0] and str(hdr) in t.damaged[0]
    for s in t.samples:  # offsets after the resync are still right
        for m in s.members.values():
            assert data[m.offset:m.offset + m.size] == bytes(good.read_bytes()[m.offset:m.offset + m.size])


def test_garbage_over_a_header_loses_only_the_members_under_it(tmp_path):
    """4 KB of random bytes over one member header (the fault-injection case): the index resumes at the
    next valid header instead of stopping there."""
    good = tmp_path / "good.tar"
    F.good_tar(good, 30)
    idx = index_tar(str(good))
    data = bytearray(good.read_bytes())
    hdr = idx.samples[10].members["jpg"].offset - 512
    data[hdr:hdr + 4096] = os.urandom(4096)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    t = index_tar(str(bad))
    lost = {s.key for s in idx.samples} - {s.key for s in t.samples if s.image()[1] is not None}
    assert 1 <= len(lost) <= 3 and t.damaged and t.tail_problem is None


def test_samples_group_by_key_like_webdataset():
    assert split_name("a/b.seg.png") == ("a/b", "seg.png")
    assert split_name("000123.jpg") == ("000123", "jpg")
    assert split_name("dir.v2/000.JPG") == ("dir.v2/000", "JPG")


def test_truncated_tar_keeps_what_is_complete(tmp_path):
    good = tmp_path / "good.tar"
    F.good_tar(good, 10)
    idx = index_tar(str(good))
    victim = idx.samples[6].members["jpg"]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[: victim.offset + victim.size // 2])
    t = index_tar(str(cut))
    assert [s.key for s in t.samples if "jpg" in s.members] == [s.key for s in idx.samples[:6]]
    assert [m.name for m in t.truncated] == [victim.name]
    # Cut inside a header block: tarfile stops quietly; we report the unreadable tail.
    head = tmp_path / "head.tar"
    head.write_bytes(good.read_bytes()[: victim.offset - 512 + 100])
    t = index_tar(str(head))
    assert len([s for s in t.samples if "jpg" in s.members]) == 6
    assert t.tail_problem and "truncated or damaged tar" in t.tail_problem
    # Garbage after the end-of-archive blocks is reported too; zero padding is not.
    junk = tmp_path / "junk.tar"
    junk.write_bytes(good.read_bytes() + b"\x00" * 4096)
    assert index_tar(str(junk)).tail_problem is None
    junk.write_bytes(good.read_bytes() + b"GARBAGE" * 100)
    t = index_tar(str(junk))
    assert len(t.samples) == 10 and "truncated or damaged tar" in t.tail_problem


def test_unreadable_tars_say_why(tmp_path):
    cases = {"zero.tar": b"", "page.tar": b"<html><body>502 Bad Gateway</body></html>" * 20}
    raw = tmp_path / "raw.tar"
    F.good_tar(raw, 2)
    cases["packed.tar"] = gzip.compress(raw.read_bytes())
    want = {"zero.tar": "empty file", "page.tar": "not a tar file", "packed.tar": "compressed tar"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TarUnreadable, match=want[name]):
            index_tar(str(tmp_path / name))


def test_dali_index_format(tmp_path):
    path = tmp_path / "a.tar"
    F.good_tar(path, 3)
    idx = index_tar(str(path))
    out = tmp_path / "a.idx"
    write_dali_index(str(out), idx.samples[:2])
    lines = out.read_text().splitlines()
    assert lines[0] == "v1.2 2"
    first = lines[1].split()
    assert first[0::4] == ["jpg", "json", "txt"] and first[3] == "000000000.jpg"
    assert int(first[1]) == idx.samples[0].members["jpg"].offset and int(first[2]) == idx.samples[0].members["jpg"].size
    with pytest.raises(ValueError):
        write_dali_index(str(out), [])


def test_dali_reads_a_v11_index_written_for_names_with_spaces(tmp_path):
    from nvidia.dali import fn, pipeline_def, types

    path = tmp_path / "a.tar"
    F.write_raw_tar(path, [("my pic.jpg", F.jpeg(40, 30, 1)), ("my pic.txt", b"hello"),
                           ("other.jpg", F.jpeg(20, 10, 2))])
    idx = index_tar(str(path))
    write_dali_index(str(tmp_path / "a.idx"), idx.samples)
    assert (tmp_path / "a.idx").read_text().splitlines()[0] == "v1.1 2"

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        img, txt = fn.readers.webdataset(paths=[str(path)], index_paths=[str(tmp_path / "a.idx")],
                                         ext=["jpg", "txt"], missing_component_behavior="empty")
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), txt

    p = pipe()
    p.build()
    img, txt = p.run()
    assert [tuple(img[i].shape()) for i in range(2)] == [(30, 40, 3), (10, 20, 3)]
    assert bytes(np.array(txt[0])) == b"hello" and np.array(txt[1]).size == 0
