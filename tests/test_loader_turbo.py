"""The `pil` decoder's libjpeg-turbo path (aimv2data/loader/decode_turbo.py, issue 15 point 5): the scale
it picks, the size it decodes at, EXIF orientation, and the fall-backs to Pillow (no binding, not a JPEG,
CMYK, damaged bytes, no orientation column). Agreement with DALI: tests/test_loader_decoders.py."""
import io

import numpy as np
import pytest
from PIL import Image

from _loader_fixtures import encode_jpeg, make_image
from aimv2data.loader import decode_turbo
from aimv2data.loader.decode_pil import PilDecoder
from aimv2data.loader.geometry import Crop, cover, random_resized_crop

pytest.importorskip("simplejpeg")
TOL = 0.05 * 0.27 * 255      # the agreement tolerance (0.05 normalised units) in grey levels


def _crop(src, box, out=(224, 224), flip=False):
    return Crop(tuple(float(v) for v in box), src, out, flip)


@pytest.mark.parametrize("reduction,gap,m", [(1.0, 1, 8), (2.4, 1, 8), (2.5, 1, 4), (4.99, 1, 4), (5.0, 1, 2),
                                             (9.9, 1, 2), (10.0, 1, 1), (40.0, 1, 1), (5.0, 2, 4), (16.0, 2, 1)])
def test_scale_is_the_smallest_power_of_two_eighth_that_keeps_the_crop_above_the_output(reduction, gap, m):
    c = _crop((4000, 4000), (0, 0, 224 * reduction, 224 * reduction))
    assert decode_turbo.scale_eighths(c, gap) == m


def test_decodes_at_the_chosen_scale_without_a_full_size_image():
    rng = np.random.default_rng(0)
    data = encode_jpeg(make_image(801, 603, rng, photo=True))       # odd sizes: Pillow's draft would not reduce
    c = _crop((801, 603), (0, 0, 801, 603), out=(150, 110))         # 5.3x: M = 2
    im = decode_turbo.decode_scaled(data, c)
    assert im.size == (201, 151)                                     # ceil(801 * 2/8), ceil(603 * 2/8)
    full = decode_turbo.decode_scaled(data, c, scale=False)
    assert full.size == (801, 603)


def test_detailed_jpegs_keep_a_wider_gap_than_smooth_ones():
    rng = np.random.default_rng(3)
    smooth = encode_jpeg(make_image(600, 400, rng))                  # gradients: well under 1 bit per pixel
    grainy = encode_jpeg(make_image(600, 400, rng, photo=True))      # photo + sensor grain: ~2 bits per pixel
    assert 8 * len(smooth) < 600 * 400 < 8 * len(grainy)
    c = cover(600, 400, 140, 98)                                      # 4.1x: 1/4 leaves 1.02, 1/2 leaves 2.04
    assert decode_turbo.decode_scaled(smooth, c).size == (150, 100)
    assert decode_turbo.decode_scaled(grainy, c).size == (300, 200)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_and_pixels_match_pillow(orientation):
    rng = np.random.default_rng(orientation)
    display = make_image(640, 360, rng)                               # asymmetric: a wrong transpose shows
    data = encode_jpeg(display, orientation)
    crop = random_resized_crop(640, 360, 112, np.random.default_rng(orientation))
    fast = PilDecoder().decode(data, crop, orientation).astype(np.float32)
    ref = PilDecoder(turbo=False, draft=False).decode(data, crop, orientation).astype(np.float32)
    assert np.abs(fast - ref).mean() < TOL / 2
    assert np.abs(fast - ref[:, ::-1]).mean() > 2 * TOL                # the comparison sees a flip


def _jpeg(mode, size=(300, 200), **kw):
    b = io.BytesIO()
    make_image(*size, np.random.default_rng(1)).convert(mode).save(b, "JPEG", **kw)
    return b.getvalue()


@pytest.mark.parametrize("mode,kw", [("L", {}), ("RGB", {"progressive": True})], ids=["grey", "progressive"])
def test_grey_and_progressive_jpegs_take_the_fast_path_and_match_pillow(mode, kw):
    data = _jpeg(mode, **kw)
    c = cover(300, 200, 70, 49)                                       # 4.1x, smooth (< 1 bit/px): 1/4
    assert decode_turbo.decode_scaled(data, c).size == (75, 50)
    fast = PilDecoder().decode(data, c, 1).astype(np.float32)
    ref = PilDecoder(turbo=False, draft=False).decode(data, c, 1).astype(np.float32)
    assert np.abs(fast - ref).mean() < TOL / 2


def test_pillow_decides_for_cmyk_png_damaged_bytes_and_a_missing_orientation(monkeypatch):
    c = cover(300, 200, 140, 98)
    cmyk = _jpeg("CMYK")
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(png, "PNG")
    damaged = _jpeg("RGB")[:400]
    for data in (cmyk, png.getvalue(), damaged):
        assert decode_turbo.decode_scaled(data, c) is None
    assert np.array_equal(PilDecoder().decode(cmyk, c, 1), PilDecoder(turbo=False).decode(cmyk, c, 1))
    # damaged bytes are refused with or without the binding (loader/validate.py's rule, then Pillow's)
    with pytest.raises((OSError, ValueError)):
        PilDecoder().decode(damaged, c, 1)
    with pytest.raises((OSError, ValueError)):
        PilDecoder(turbo=False).decode(damaged, c, 1)

    calls = []
    monkeypatch.setattr(decode_turbo, "decode_scaled", lambda *a, **k: calls.append(a))
    PilDecoder().decode(_jpeg("RGB"), c, None)                        # no orientation column: Pillow reads EXIF
    assert calls == []


def test_without_the_binding_the_decoder_uses_pillow(monkeypatch):
    monkeypatch.setattr(decode_turbo, "simplejpeg", None)
    dec = PilDecoder()
    assert not dec.turbo
    data = _jpeg("RGB")
    c = cover(300, 200, 140, 98)
    assert np.array_equal(dec.decode(data, c, 1), PilDecoder(turbo=False).decode(data, c, 1))
