"""`aimv2 embed` and its preprocessing: grids, the features written, skipped files, flags."""
import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from aimv2data.batch import MEAN, STD
from aimv2train.model.config import EncoderConfig
from aimv2train.model.encoder import Encoder
from aimv2train.model.interop import save_encoder
from aimv2train.model.preprocess import fixed_resolution, native_grid, native_resolution, to_tensor
from cli.main import main

torch.set_num_threads(1)


def test_native_grid_keeps_small_images_and_fits_big_ones_in_the_budget():
    assert native_grid(100, 70, 1024) == (5, 7)  # own size, rounded to whole 14-px patches
    assert native_grid(224, 224, 256) == (16, 16)
    assert native_grid(2000, 1000, 128) == (8, 16)
    assert native_grid(10000, 20, 64) == (1, 64)  # extreme aspect still fits
    rng = random.Random(0)
    for _ in range(500):
        w, h, a = rng.randint(20, 5000), rng.randint(20, 5000), rng.choice([128, 256, 576, 1024, 4096])
        gh, gw = native_grid(w, h, a)
        assert 1 <= gh * gw <= a
        if (round(h / 14) * round(w / 14)) > a and min(gh, gw) >= 4:  # resized: aspect kept to a patch
            assert abs(gw / gh - w / h) <= (w / h) * (1 / gh + 1 / gw) + 1e-9


def test_pixels_are_clip_normalised():
    img = Image.new("RGB", (28, 28), (255, 0, 128))
    x = to_tensor(img)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), MEAN, STD)]
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert fixed_resolution(Image.new("RGB", (300, 200)), 224).shape == (3, 224, 224)
    assert native_resolution(Image.new("RGB", (300, 200)), 64).shape == (3, 6 * 14, 9 * 14)


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in [("a.jpg", (100, 150)), ("b.png", (300, 200)), ("c.png", (90, 90))]:
        p = tmp_path / "img" / name
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    bad = tmp_path / "img" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    return paths, bad


def _checkpoint(tmp_path, pos):
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(dim=64, depth=2, heads=2, img_size=56, pos_embed=pos)).eval()
    return enc, save_encoder(enc, tmp_path / f"{pos}.pt")


def test_embed_fixed_resolution_writes_mean_pooled_features(tmp_path, images):
    paths, bad = images
    enc, ckpt = _checkpoint(tmp_path, "learned")
    out = tmp_path / "feats.npy"
    res = CliRunner().invoke(main, ["embed", *map(str, paths), str(bad), "-c", str(ckpt), "-o", str(out)])
    assert res.exit_code == 0, res.output
    feats = np.load(out)
    assert feats.shape == (3, 64) and feats.dtype == np.float32
    with torch.no_grad():  # the learned model embeds at its own 56 px by default
        expected = enc(torch.stack([fixed_resolution(Image.open(p).convert("RGB"), 56) for p in paths])).mean(1)
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-5, atol=1e-5)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["rows"] == [str(p) for p in paths] and side["pooling"] == "mean"
    assert [s["path"] for s in side["skipped"]] == [str(bad)]  # skipped and named, nothing else lost
    assert "broken.jpg" in res.output


def test_embed_native_tokens_to_npz(tmp_path, images):
    paths, _ = images
    enc, ckpt = _checkpoint(tmp_path, "sincos")
    out = tmp_path / "tok.npz"
    res = CliRunner().invoke(main, ["embed", str(paths[0].parent), "-c", str(ckpt), "-o", str(out), "--tokens",
                                    "--max-patches", "64"])
    assert res.exit_code == 0, res.output
    z = np.load(out)
    side = json.loads(out.with_suffix(".json").read_text())
    rows = side["rows"]
    assert [r.rsplit("/", 1)[-1] for r in rows] == ["a.jpg", "b.png", "c.png"]  # directory, sorted
    assert side["grids"] == [[6, 9], [9, 6], [6, 6]] and z["grids"].tolist() == side["grids"]
    for i, row in enumerate(rows):
        x = native_resolution(Image.open(row).convert("RGB"), 64)
        with torch.no_grad():
            tokens = enc(x[None])[0].numpy()
        np.testing.assert_allclose(z[f"tokens_{i:05d}"], tokens, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(z["pooled"][i], tokens.mean(0), rtol=1e-5, atol=1e-5)


def test_embed_tokens_at_fixed_resolution_and_flag_errors(tmp_path, images):
    paths, _ = images
    _, ckpt = _checkpoint(tmp_path, "sincos")
    out = tmp_path / "t.npy"
    res = CliRunner().invoke(main, ["embed", *map(str, paths), "-c", str(ckpt), "-o", str(out), "--tokens",
                                    "--resolution", "42"])
    assert res.exit_code == 0, res.output
    assert np.load(out).shape == (3, 9, 64)
    res = CliRunner().invoke(main, ["embed", str(paths[0]), "-c", str(ckpt), "-o", str(out), "--resolution", "56",
                                    "--native-res"])
    assert res.exit_code != 0 and "exclusive" in res.output
    res = CliRunner().invoke(main, ["embed", str(paths[0]), str(paths[1]), "-c", str(ckpt), "-o", str(out),
                                    "--tokens", "--native-res"])
    assert res.exit_code != 0 and "write .npz" in res.output
    res = CliRunner().invoke(main, ["embed", str(paths[0]), "-c", str(ckpt), "-o", str(tmp_path / "x.txt")])
    assert res.exit_code != 0 and ".npy or .npz" in res.output


def test_fixed_resolution_is_clip_image_processor_exactly():
    # the released AIMv2 folders' processor: shortest_edge R (bicubic), centre crop, CLIP mean/std. Its
    # longer side is int(R * long / short), truncated: sizes where rounding differs are the point here.
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(0)
    sizes = [(301, 200), (200, 301), (333, 224), (224, 599), (1000, 677), (225, 224), (224, 224), (97, 50)]
    for w, h in sizes + [tuple(int(v) for v in rng.integers(60, 700, 2)) for _ in range(24)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        for R in (56, 224):
            proc = CLIPImageProcessor(size={"shortest_edge": R}, crop_size={"height": R, "width": R},
                                      resample=3, image_mean=list(MEAN), image_std=list(STD))
            ref = torch.from_numpy(proc(images=img, return_tensors="np")["pixel_values"][0])
            torch.testing.assert_close(fixed_resolution(img, R), ref, rtol=0, atol=1e-5, msg=f"{w}x{h} R={R}")
