"""inspect_image(): every kind of input a crawl produces is kept with its display size, or rejected with its
reason; the cheap `header` level agrees with a full decode on everything but damage inside the
compressed data (`bitrot`), which `draft`/`decode` catch."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from aimv2data.manifest.inspect_image import Rejected, inspect_image, sniff

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402

CASES = [c for c in F.catalogue() if c.data is not None]
BUILD_LEVEL = {"extreme_aspect"}   # decided by the build's --max-aspect, not by inspect_image


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue_case(case):
    for level in ("header", "decode"):
        if case.expect == "keep" or case.expect in BUILD_LEVEL:
            p = inspect_image(case.data, level)
            if case.size:
                assert (p.width, p.height) == case.size, level
            if case.fmt:
                assert p.format == case.fmt
            if case.mode:
                assert p.mode == case.mode
        else:
            with pytest.raises(Rejected) as e:
                inspect_image(case.data, level)
            assert e.value.reason == case.expect, (level, e.value.detail)
            assert e.value.detail   # every rejection says what exactly


def test_exif_orientation_gives_display_size_and_column():
    for o in range(1, 9):
        p = inspect_image(F.jpeg(64, 48, orientation=o))
        assert p.orientation == o
        assert (p.width, p.height) == ((48, 64) if o >= 5 else (64, 48))


def test_flags_for_modes_the_loader_may_care_about():
    by = {c.name: inspect_image(c.data) for c in CASES if c.expect == "keep"}
    assert by["palette_trns"].alpha and by["rgba_png"].alpha and by["la_png"].alpha and by["webp_alpha"].alpha
    assert not by["rgb_jpeg"].alpha and not by["cmyk_jpeg"].alpha
    assert by["gray16_png"].bit_depth == 16 and by["rgb16_png"].bit_depth == 16 and by["bilevel_png"].bit_depth == 1
    assert by["cmyk_jpeg"].mode == "CMYK" and by["mpo"].format == "jpeg"


@pytest.mark.parametrize("case", F.bitrot(), ids=[c.name for c in F.bitrot()])
def test_bitrot_needs_a_decode_level(case):
    p = inspect_image(case.data, "header")                  # no pixel decoded: cannot see it
    assert (p.width, p.height) == case.size
    for level in ("draft", "decode"):
        with pytest.raises(Rejected) as e:
            inspect_image(case.data, level)
        assert e.value.reason == "corrupt"


def test_draft_level_catches_jpeg_damage_header_cannot():
    # Entropy data cut and re-terminated with EOI: structurally complete, and libjpeg (PIL, DALI) decodes
    # it with grey fill; all levels keep it, as DALI does not die on it either.
    j = F.jpeg(320, 240, 3)
    cut = j[: len(j) * 7 // 10] + b"\xff\xd9"
    for level in ("header", "draft", "decode"):
        assert inspect_image(cut, level).width == 320


def test_malformed_exif_keeps_the_image_with_orientation_1():
    j = F.jpeg(64, 48)
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12" + b"\xff" * 9
    seg = b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1
    p = inspect_image(j[:2] + seg + j[2:])
    assert (p.width, p.height, p.orientation) == (64, 48, 1)
    assert p.exif_error


def test_sniff_names_what_it_refuses():
    with pytest.raises(Rejected, match="HTML"):
        sniff(b"\n\n  <html><head><title>Not found</title></head></html>")
    assert sniff(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>') == "SVG"
    assert sniff(b"\x00\x00\x00\x1cftypavif" + bytes(20)) == "AVIF"
    with pytest.raises(Rejected) as e:
        inspect_image(b"\x00\x00\x00\x1cftypavif" + bytes(20))
    assert e.value.reason == "unsupported_format:AVIF"


def test_inspect_leaves_pil_bomb_limit_alone():
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Rejected):
        inspect_image(F.png_bomb())
    assert Image.MAX_IMAGE_PIXELS == before


def test_bombs_are_rejected_from_the_header_under_a_memory_cap(tmp_path: Path):
    """With the address space capped at 2 GiB, any attempt to decode the 3.6-gigapixel JPEG (10.8 GB RGB)
    or the 400 MP PNG would fail with MemoryError; they must be rejected before that, at every level."""
    (tmp_path / "jpeg_bomb").write_bytes(F.jpeg_with_size(60000, 60000))
    (tmp_path / "png_bomb").write_bytes(F.png_bomb())
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from aimv2data.manifest.inspect_image import inspect_image, Rejected
        for name in ("jpeg_bomb", "png_bomb"):
            data = open({str(tmp_path)!r} + "/" + name, "rb").read()
            for level in ("header", "draft", "decode"):
                try:
                    inspect_image(data, level)
                    print(name, level, "KEPT")
                except Rejected as e:
                    print(name, level, e.reason)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert sum(line.endswith(" decompression_bomb") for line in lines) == 6, out.stdout


def test_unknown_verify_level_is_an_error():
    with pytest.raises(ValueError, match="verify"):
        inspect_image(F.jpeg(), "full")
