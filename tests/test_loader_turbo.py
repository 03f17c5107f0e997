"""The `pil` decoder's libjpeg-turbo path (aimv2data/loader/decode_turbo.py, issue 15 point 5): the scale
it picks, the window and size it decodes, the same pixels with and without the crop-window binding
(`_jpegcrop`), EXIF orientation, and the fall-backs to Pillow (no binding, not a JPEG, CMYK, damaged bytes,
decompression bombs, no orientation column). Agreement with DALI: tests/test_loader_decoders.py."""
import io

import numpy as np
import pytest
from PIL import Image

from _loader_fixtures import encode_jpeg, make_image
from aimv2data.loader import decode_turbo
from aimv2data.loader.decode_pil import PilDecoder
from aimv2data.loader.geometry import Crop, cover, random_resized_crop

simplejpeg = pytest.importorskip("simplejpeg")
TOL = 0.05 * 0.27 * 255      # the agreement tolerance (0.05 normalised units) in grey levels
WINDOW = decode_turbo._jpegcrop
needs_window = pytest.mark.skipif(WINDOW is None, reason="_jpegcrop not built (no libjpeg-turbo headers at install)")


@pytest.fixture(params=["window", "whole"])
def binding(request, monkeypatch):
    """Each test of this fixture runs with the crop-window binding and with simplejpeg alone."""
    if request.param == "window" and WINDOW is None:
        pytest.skip("_jpegcrop not built")
    if request.param == "whole":
        monkeypatch.setattr(decode_turbo, "_jpegcrop", None)
    return request.param


def _crop(src, box, out=(224, 224), flip=False):
    return Crop(tuple(float(v) for v in box), src, out, flip)


# 1/2 leaves >= 1.25 source px per output px; 1/4 and 1/8 (coarser IDCTs) >= 1.5; a larger reducing_gap wins
@pytest.mark.parametrize("reduction,gap,m", [(1.0, 1, 8), (2.4, 1, 8), (2.5, 1, 4), (5.99, 1, 4), (6.0, 1, 2),
                                             (11.9, 1, 2), (12.0, 1, 1), (40.0, 1, 1), (5.0, 2, 4), (16.0, 2, 1)])
def test_scale_is_the_smallest_power_of_two_eighth_that_keeps_the_crop_above_the_output(reduction, gap, m):
    c = _crop((4000, 4000), (0, 0, 224 * reduction, 224 * reduction))
    assert decode_turbo.scale_eighths(c, gap) == m


def test_decodes_at_the_chosen_scale_and_only_the_window(binding):
    rng = np.random.default_rng(0)
    data = encode_jpeg(make_image(801, 603, rng, photo=True))       # odd sizes: Pillow's draft would not reduce
    c = _crop((801, 603), (0, 0, 801, 603), out=(130, 95))          # 6.2x: M = 2 (1/4 leaves 1.54)
    im, box, size = decode_turbo.decode_window(data, c)
    assert size == im.size == (201, 151)                             # ceil(801 * 2/8), ceil(603 * 2/8)
    assert box == (0, 0, 201, 151)
    assert decode_turbo.decode_window(data, c, scale=False)[2] == (801, 603)
    corner = _crop((801, 603), (0, 0, 300, 200), out=(100, 100))    # 2x: full size, the top-left corner
    im, box, size = decode_turbo.decode_window(data, corner)
    assert size == (801, 603) and box[:2] == (0, 0)
    if binding == "window":                                          # the box + the filter's reach, no more
        assert 300 < im.width < 340 and 200 < im.height < 215
    else:
        assert im.size == (801, 603)


def test_detailed_jpegs_keep_a_wider_gap_than_smooth_ones(binding):
    rng = np.random.default_rng(3)
    smooth = encode_jpeg(make_image(600, 400, rng))                  # gradients: well under 1 bit per pixel
    grainy = encode_jpeg(make_image(600, 400, rng, photo=True))      # photo + sensor grain: ~2 bits per pixel
    assert 8 * len(smooth) < 600 * 400 < 8 * len(grainy)
    c = cover(600, 400, 140, 98)                                      # 4.1x: 1/4 leaves 1.02, 1/2 leaves 2.04
    assert decode_turbo.decode_window(smooth, c)[2] == (150, 100)
    assert decode_turbo.decode_window(grainy, c)[2] == (300, 200)


@needs_window
@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_window_gives_the_pixels_of_a_whole_image_decode(orientation, monkeypatch):
    """Crops anywhere (edges included), every scale, every EXIF orientation, flips: the crop-window
    decode and simplejpeg's whole-image decode at the same scale agree to two grey levels (Pillow's resize
    sees the same pixels within its filter's reach; the box offset by the window rounds its fixed-point
    weights, one level per pass, now and then)."""
    rng = np.random.default_rng(10 + orientation)
    for k in range(6):
        w, h = int(rng.integers(150, 1300)), int(rng.integers(150, 1300))
        data = encode_jpeg(make_image(w, h, rng, photo=k % 2 == 1), orientation)
        out = int(rng.choice([32, 112, 224]))
        crops = [random_resized_crop(w, h, out, rng), cover(w, h, out, out * 3 // 4, flip=True),
                 _crop((w, h), (w * 0.6, h * 0.7, w, h), (out, out)), _crop((w, h), (0, 0, w * 0.3, h * 0.2), (out, out))]
        for c in crops:
            window = PilDecoder().decode(data, c, orientation).astype(int)
            with monkeypatch.context() as m:
                m.setattr(decode_turbo, "_jpegcrop", None)
                whole = PilDecoder().decode(data, c, orientation).astype(int)
            assert np.abs(window - whole).max() <= 2 and np.abs(window - whole).mean() < 0.01, (w, h, c)


@needs_window
@pytest.mark.parametrize("sampling", ["444", "422", "420", "440", "411", "Gray"])
def test_every_chroma_subsampling_decodes_like_pillow(sampling):
    """4:4:0 and 4:1:1 are decoded full width from the top (see _jpegcrop.c); the rest as windows."""
    rng = np.random.default_rng(5)
    im = make_image(500, 340, rng, photo=True)
    if sampling == "Gray":
        data = simplejpeg.encode_jpeg(np.asarray(im.convert("L"))[..., None], 90, "GRAY", "Gray")
    else:
        data = simplejpeg.encode_jpeg(np.asarray(im), 90, "RGB", sampling)
    c = _crop((500, 340), (200, 150, 420, 330), out=(112, 112))
    fast = PilDecoder().decode(data, c, 1).astype(np.float32)
    ref = PilDecoder(turbo=False, draft=False).decode(data, c, 1).astype(np.float32)
    assert np.abs(fast - ref).mean() < TOL / 2


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
def test_grey_and_progressive_jpegs_take_the_fast_path_and_match_pillow(mode, kw, binding):
    data = _jpeg(mode, **kw)
    c = cover(300, 200, 70, 49)                                       # 4.1x, smooth (< 1 bit/px): 1/4
    assert decode_turbo.decode_window(data, c)[2] == (75, 50)
    fast = PilDecoder().decode(data, c, 1).astype(np.float32)
    ref = PilDecoder(turbo=False, draft=False).decode(data, c, 1).astype(np.float32)
    assert np.abs(fast - ref).mean() < TOL / 2


def test_pillow_decides_for_cmyk_png_damaged_bytes_and_a_missing_orientation(monkeypatch, binding):
    c = cover(300, 200, 140, 98)
    cmyk = _jpeg("CMYK")
    png = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(png, "PNG")
    damaged = _jpeg("RGB")[:400]
    for data in (cmyk, png.getvalue(), damaged):
        assert decode_turbo.decode_window(data, c) is None
    assert np.array_equal(PilDecoder().decode(cmyk, c, 1), PilDecoder(turbo=False).decode(cmyk, c, 1))
    # damaged bytes are refused with or without the binding (loader/validate.py's rule, then Pillow's)
    with pytest.raises((OSError, ValueError)):
        PilDecoder().decode(damaged, c, 1)
    with pytest.raises((OSError, ValueError)):
        PilDecoder(turbo=False).decode(damaged, c, 1)

    calls = []
    monkeypatch.setattr(decode_turbo, "decode_window", lambda *a, **k: calls.append(a))
    PilDecoder().decode(_jpeg("RGB"), c, None)                        # no orientation column: Pillow reads EXIF
    assert calls == []


def test_decompression_bombs_are_left_to_pillow(monkeypatch, binding):
    data = _jpeg("RGB")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 200 // 3)      # the image is 3x the limit
    assert decode_turbo.decode_window(data, cover(300, 200, 140, 98)) is None
    with pytest.raises(Image.DecompressionBombError):
        PilDecoder().decode(data, cover(300, 200, 140, 98), 1)


def test_a_damaged_scan_is_left_to_pillow(binding):
    """Damage that keeps the byte-stuffing intact passes validate.py's rule; libjpeg-turbo warns, and
    this path refuses any warning (strict), so Pillow decodes it exactly as without the binding."""
    data = bytearray(_jpeg("RGB", (320, 240)))
    data[len(data) // 2: len(data) // 2 + 40] = bytes(40)             # zeros: valid stuffing, broken codes
    c = cover(320, 240, 140, 98)
    assert decode_turbo.decode_window(bytes(data), c) is None
    assert np.array_equal(PilDecoder().decode(bytes(data), c, 1), PilDecoder(turbo=False).decode(bytes(data), c, 1))


def test_without_the_binding_the_decoder_uses_pillow(monkeypatch):
    monkeypatch.setattr(decode_turbo, "simplejpeg", None)
    monkeypatch.setattr(decode_turbo, "_jpegcrop", None)
    dec = PilDecoder()
    assert not dec.turbo
    data = _jpeg("RGB")
    c = cover(300, 200, 140, 98)
    assert np.array_equal(dec.decode(data, c, 1), PilDecoder(turbo=False).decode(data, c, 1))
