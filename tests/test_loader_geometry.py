"""Geometry (cover + centre crop, RandomResizedCrop, draft scale) and the pil decoder's pixels."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from _loader_fixtures import encode_jpeg, make_image
from aimv2data.loader.decode_pil import PilDecoder
from aimv2data.loader.geometry import cover, draft_scale, random_resized_crop

torch.set_num_threads(1)


@pytest.mark.parametrize("src,out", [((640, 480), (224, 224)), ((300, 1200), (154, 308)),
                                     ((1000, 250), (448, 112)), ((57, 57), (896, 896))])
def test_cover_is_the_centred_box_of_the_output_aspect(src, out):
    c = cover(*src, *out)
    x0, y0, x1, y1 = c.box
    assert (x1 - x0) / (y1 - y0) == pytest.approx(out[0] / out[1], rel=1e-9)
    assert 0 <= x0 and 0 <= y0 and x1 <= src[0] + 1e-9 and y1 <= src[1] + 1e-9
    assert x1 - x0 == pytest.approx(src[0]) or y1 - y0 == pytest.approx(src[1])   # one side is whole
    assert (x0 + x1) / 2 == pytest.approx(src[0] / 2) and (y0 + y1) / 2 == pytest.approx(src[1] / 2)
    assert c.padding() == 0.0


def test_random_resized_crop_draws_torchvision_parameters():
    rng = np.random.default_rng(0)
    areas, ratios, flips = [], [], 0
    for _ in range(3000):
        c = random_resized_crop(800, 600, 224, rng)
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < x1 <= 800 and 0 <= y0 < y1 <= 600 and c.out == (224, 224)
        assert all(float(v).is_integer() for v in c.box)             # integer boxes, like torchvision
        areas.append((x1 - x0) * (y1 - y0) / (800 * 600))
        ratios.append((x1 - x0) / (y1 - y0))
        flips += c.flip
    areas, ratios = np.array(areas), np.array(ratios)
    assert areas.min() >= 0.4 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    assert abs(flips / 3000 - 0.5) < 0.04
    # Same generator state -> same crop: the loader seeds it from (seed, epoch, row).
    a = random_resized_crop(800, 600, 224, np.random.default_rng(7))
    b = random_resized_crop(800, 600, 224, np.random.default_rng(7))
    assert a == b


def test_random_resized_crop_falls_back_to_a_centre_crop_for_extreme_images():
    # 10:1 can never host a crop with ratio <= 4/3 covering >= 40 %: centre crop clamped to 4/3.
    c = random_resized_crop(1000, 100, 224, np.random.default_rng(0), hflip=0.0)
    x0, y0, x1, y1 = c.box
    assert (y0, y1) == (0, 100) and x1 - x0 == round(100 * 4 / 3) and x0 == (1000 - 133) // 2


def test_draft_scale_never_upsamples_a_draft():
    assert draft_scale(cover(2000, 1500, 224, 224)) == 4          # 1500/224 = 6.7
    assert draft_scale(cover(2000, 2000, 224, 224)) == 8          # 8.9
    assert draft_scale(cover(400, 300, 224, 224)) == 1            # 1.3
    assert draft_scale(cover(2000, 1500, 224, 224), reducing_gap=2.0) == 2
    for s in (300, 500, 900, 1800, 3000):
        c = cover(s, s, 224, 224)
        assert c.reduction() / draft_scale(c) >= 1.0


def _reference(display: Image.Image, crop) -> np.ndarray:
    """Full-resolution decode of the display image + the same box, bicubic: what drafting approximates."""
    out = display.resize(crop.out, Image.BICUBIC, box=crop.box)
    if crop.flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out).astype(np.float32)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_pil_applies_exif_orientation_so_boxes_are_in_display_space(orientation):
    rng = np.random.default_rng(orientation)
    display = make_image(160, 90, rng)
    data = encode_jpeg(display, orientation, quality=95)
    crop = cover(160, 90, 64, 64)                           # centre square of the DISPLAY image
    got = PilDecoder().decode(data, crop).astype(np.float32)              # orientation read by PIL
    ref = _reference(display, crop)
    assert got.shape == (64, 64, 3)
    # the manifest's orientation column drives the same transposes
    assert np.array_equal(PilDecoder().decode(data, crop, orientation), got.astype(np.uint8))
    assert np.abs(got - ref).mean() < 3.0                   # JPEG noise only (0..255 scale)
    # and a wrong orientation would be far off: the pattern is asymmetric
    assert np.abs(np.flipud(got) - ref).mean() > 20 or orientation == 1


def test_pil_draft_decodes_at_reduced_scale_and_stays_close_to_a_full_decode():
    rng = np.random.default_rng(0)
    display = make_image(1600, 1200, rng, photo=True)
    data = encode_jpeg(display, 1, quality=90)
    crop = random_resized_crop(1600, 1200, 224, np.random.default_rng(3))
    assert draft_scale(crop) >= 2
    # draft really shrinks what libjpeg decodes
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (math.ceil(1600 / draft_scale(crop)), math.ceil(1200 / draft_scale(crop))))
    assert im.size[0] <= 1600 // 2
    drafted = PilDecoder(draft=True).decode(data, crop).astype(np.float32)
    full = PilDecoder(draft=False).decode(data, crop).astype(np.float32)
    # In CLIP-normalised units (std ~0.27): mean abs difference well under 0.05.
    assert np.abs(drafted - full).mean() / (0.27 * 255) < 0.03
    assert np.abs(full - _reference(display, crop)).mean() < 4.0


def test_pil_decode_batch_reports_a_corrupt_sample_and_keeps_the_others():
    rng = np.random.default_rng(0)
    good = encode_jpeg(make_image(80, 60, rng))
    crops = [cover(80, 60, 32, 32)] * 3
    images, failed = PilDecoder().decode_batch([good, b"\xff\xd8garbage", good[: len(good) // 3]], crops)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8   # the Batch contract
    assert set(failed) == {1, 2}                               # garbage and a truncated file
    assert "Error" in failed[1] or "cannot identify" in failed[1]
