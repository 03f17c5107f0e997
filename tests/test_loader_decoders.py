"""`pil` and `dali` decoders: same rows, same grids, close pixels (CPU DALI here, device_id=None);
and both stream from a manifest built by the real `aimv2 shard` over the demo corpus."""
import io
import json

import pytest
import torch

from _loader_fixtures import build_manifest
from aimv2data.batch import normalize
from aimv2data.loader import Loader

pytest.importorskip("nvidia.dali")
torch.set_num_threads(1)

# Tolerance in CLIP-normalised units (1 unit ~ 0.27 * 255 = 69 grey levels). The two resize kernels
# differ (Pillow's bicubic vs DALI's antialiased cubic) and PIL may decode a JPEG draft: measured
# ~0.003 without a draft and ~0.01-0.03 with one; a wrong box, flip or EXIF rotation gives > 0.3.
MEAN_TOL = 0.02
IMAGE_TOL = 0.05


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return build_manifest(tmp_path_factory.mktemp("photos"), n=48, seed=2, photo=True, min_side=200,
                          max_side=1000, aspects=[0.5, 0.75, 1.0, 4 / 3, 2.0], exif_every=4, corrupt=(7,))


def _compare(a, b):
    n = 0
    worst = []
    for x, y in zip(a, b):
        assert x.keys == y.keys and x.grid == y.grid and x.images.shape == y.images.shape
        assert [k for k, _ in x.replaced] == [k for k, _ in y.replaced]
        assert x.images.dtype == y.images.dtype == torch.uint8        # both hand over uint8 (issue 22)
        assert x.images.stride() == y.images.stride()                # in one layout: no recompiles
        d = (normalize(x.images) - normalize(y.images.cpu())).abs().mean(dim=(1, 2, 3))
        worst.append(d)
        n += 1
    d = torch.cat(worst)
    assert n > 0
    assert d.mean() < MEAN_TOL and d.max() < IMAGE_TOL, (d.mean(), d.max())
    return d


def _steps(loader, n):
    """The first n steps, across segments (a tiny manifest's segments are a step or two)."""
    it = (b for _ in range(n) for b in loader)
    return (b for _, b in zip(range(n), it))


def test_native_resolution_pil_and_dali_agree(photos):
    kw = dict(native_res=True, batch_patches=4096, seed=0, mix="rows")
    d = _compare(_steps(Loader(photos, decoder="pil", **kw), 8), _steps(Loader(photos, decoder="dali", **kw), 8))
    assert len(d) > 30


def test_fixed_resolution_pil_and_dali_agree_including_flips_and_drafts(photos):
    kw = dict(resolution=224, batch_size=8, seed=1)
    pil = list(Loader(photos, decoder="pil", **kw))
    dali = list(Loader(photos, decoder="dali", workers=2, **kw))
    _compare(pil, dali)
    # and the comparison is sharp enough to see a wrong flip
    x, y = normalize(pil[0].images), normalize(dali[0].images.flip(-1))
    assert (x - y).abs().mean() > 0.1


def test_dali_replaces_a_corrupt_sample_like_pil(photos):
    loader = Loader(photos, resolution=224, batch_size=8, decoder="dali", seed=3)
    list(loader)
    assert loader.stats["replaced"] == 1
    assert loader.stats["replaced_keys"][0][0] == "000000007"
    assert not loader.stats["replaced_keys"][0][1].startswith("DALI:")    # screened by PIL before DALI


def _demo_tars(tmp_path):
    """The demo corpus (JPEG baseline/progressive/grey, PNG RGB/L/RGBA, WebP, EXIF 2..8) as one
    img2dataset-style webdataset tar."""
    import webdataset as wds

    from aimv2data.demo_corpus import EXT, corpus

    out = tmp_path / "shards"
    out.mkdir()
    with wds.TarWriter(str(out / "00000.tar")) as tw:
        for i, im in enumerate(corpus()):
            key = f"{i:09d}"
            tw.write({"__key__": key, EXT[im.format]: im.data, "txt": im.caption,
                      "json": {"key": key, "status": "success", "source": "dfn" if im.in_dfn else "coyo"}})
    return out


@pytest.mark.slow
def test_both_modes_stream_from_a_real_shard_manifest_of_the_demo_corpus(tmp_path):
    build = pytest.importorskip("aimv2data.manifest.build")
    shards = _demo_tars(tmp_path)
    report = build.build_manifest([str(shards)], tmp_path / "manifest", progress=False)
    assert report["merged"] and report["samples"] == 80
    man = tmp_path / "manifest"
    meta = json.loads((man / "_manifest.json").read_text())
    assert meta["patch_size"] == 14 and len(meta["buckets"]) == 33

    native = Loader(man, native_res=True, batch_patches=4096, decoder="pil")
    keys = [k for b in _steps(native, 12) for k in b.keys]
    # 80 samples over 33 buckets: most buckets hold fewer rows than one batch, so batches cycle a bucket
    assert len(set(keys)) > 20 and native.stats["replaced"] == 0
    kw = dict(resolution=224, batch_size=8, seed=0)
    _compare(Loader(man, decoder="pil", **kw), Loader(man, decoder="dali", **kw))
    kw = dict(native_res=True, batch_patches=4096, seed=0)
    _compare(_steps(Loader(man, decoder="pil", **kw), 6), _steps(Loader(man, decoder="dali", **kw), 6))


def test_dali_error_path_rebuilds_and_names_the_bad_sample():
    # A PNG cut after its header: PIL can parse the header (it passes the screen), DALI's decoder fails.
    # The pipeline is invalid after an operator error; the decoder rebuilds it, probes each sample and
    # reports the bad one; the good samples' pixels equal a clean run's.
    import numpy as np
    from PIL import Image

    from _loader_fixtures import encode_jpeg, make_image
    from aimv2data.loader.decode_dali import DaliDecoder
    from aimv2data.loader.geometry import cover

    rng = np.random.default_rng(0)
    good = [encode_jpeg(make_image(90, 60, rng)) for _ in range(3)]
    buf = io.BytesIO()
    Image.new("RGB", (90, 60)).save(buf, "PNG")
    bad = buf.getvalue()[:60]
    crops = [cover(90, 60, 42, 28)] * 4
    dec = DaliDecoder(max_batch=8)
    clean, failed = dec.decode_batch(good, crops[:3])
    assert failed == {}
    images, failed = dec.decode_batch([good[0], bad, good[1], good[2]], crops)
    assert list(failed) == [1] and failed[1].startswith("DALI:")
    assert torch.equal(images[[0, 2, 3]], clean)
    again, failed = dec.decode_batch(good, crops[:3])                  # the rebuilt pipeline works
    assert failed == {} and torch.equal(again, clean)


def test_both_decoders_accept_and_reject_the_same_damaged_jpegs():
    """Random bytes over the middle of JPEGs (issue 12): libjpeg calls most such damage a warning, Pillow
    raised on some and DALI (CPU) on none, so `dali` trained on files `pil` replaced. Both now apply the
    same rule (loader/validate.py) and fail the same slots."""
    import io
    import random

    from PIL import Image
    from skimage import data as photos

    from aimv2data.loader.decode_dali import DaliDecoder
    from aimv2data.loader.decode_pil import PilDecoder
    from aimv2data.loader.geometry import cover
    from aimv2data.loader.validate import jpeg_problem

    rng = random.Random(0)
    datas = []
    b = io.BytesIO()
    Image.fromarray(photos.astronaut()).save(b, "JPEG", quality=90)
    assert jpeg_problem(b.getvalue()) is None
    for _i in range(24):
        raw = bytearray(b.getvalue())
        pos = rng.randrange(len(raw) // 4, 3 * len(raw) // 4)
        raw[pos:pos + 64] = bytes(rng.randrange(256) for _ in range(64))
        datas.append(bytes(raw))
    datas.append(datas[0][: len(datas[0]) // 2])            # truncated: no EOI
    crops = [cover(512, 512, 112, 112, False)] * len(datas)
    _, pil_failed = PilDecoder().decode_batch(datas, crops)
    _, dali_failed = DaliDecoder(len(datas), 1, device_id=None).decode_batch(datas, crops)
    assert sorted(pil_failed) == sorted(dali_failed)
    assert 3 <= len(pil_failed) < len(datas) and len(datas) - 1 in pil_failed
