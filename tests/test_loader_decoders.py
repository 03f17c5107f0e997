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


# --- issue 22 point 4: DALI decodes only the crop's window, with buffers sized for the largest batch ----

def _whole_image_pipeline(n):
    """The pipeline the `dali` decoder had before: whole-image decode, relative ROI in the resize, flip."""
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    pipe = Pipeline(batch_size=n, num_threads=1, device_id=None, prefetch_queue_depth=1)
    with pipe:
        enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1)
        rs, re_ = (fn.external_source(name=k, dtype=types.FLOAT, ndim=1) for k in ("rs", "re"))
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        img = fn.decoders.image(enc, device="cpu", output_type=types.RGB, adjust_orientation=True)
        img = fn.resize(img, roi_start=rs, roi_end=re_, roi_relative=True, size=size, interp_type=types.INTERP_CUBIC,
                        antialias=True)
        pipe.set_outputs(fn.flip(img, horizontal=mirror))
    pipe.build()
    return pipe


@pytest.mark.parametrize("out", [(224, 224), (98, 56), (700, 420)], ids=["fixed", "native", "enlarging"])
def test_dali_window_decode_gives_the_pixels_of_the_whole_image_decode(out):
    """Every EXIF orientation, boxes inside the image and touching its edges, flips; shrinking and enlarging."""
    import numpy as np

    from _loader_fixtures import encode_jpeg, make_image
    from aimv2data.loader.decode_dali import DaliDecoder
    from aimv2data.loader.geometry import Crop

    rng = np.random.default_rng(3)
    datas, crops, orients = [], [], []
    for i in range(8):
        w, h = int(rng.integers(300, 800)), int(rng.integers(300, 800))
        orients.append(i + 1)
        datas.append(encode_jpeg(make_image(w, h, rng, photo=True), orientation=i + 1))
        bw, bh = rng.uniform(0.3, 1.0) * w, rng.uniform(0.3, 1.0) * h
        x0 = 0.0 if i % 3 == 0 else rng.uniform(0, w - bw)            # some boxes on the image's edges
        y0 = h - bh if i % 4 == 1 else rng.uniform(0, h - bh)
        crops.append(Crop((x0, y0, x0 + bw, y0 + bh), (w, h), out, flip=bool(i % 2)))
    got, failed = DaliDecoder(8, 1, device_id=None).decode_batch(datas, crops, orients)
    assert failed == {} and got.shape == (8, 3, out[1], out[0]) and got.dtype == torch.uint8
    ref = _whole_image_pipeline(8)
    ref.feed_input("enc", [np.frombuffer(d, np.uint8) for d in datas])
    rel = [c.relative() for c in crops]
    ref.feed_input("rs", [np.array([r[1], r[0]], np.float32) for r in rel])
    ref.feed_input("re", [np.array([r[3], r[2]], np.float32) for r in rel])
    ref.feed_input("size", [np.array([out[1], out[0]], np.float32)] * 8)
    ref.feed_input("mirror", [np.array(int(c.flip), np.int32) for c in crops])
    (whole,) = ref.run()
    whole = torch.from_numpy(np.array(whole.as_tensor())).permute(0, 3, 1, 2)
    diff = (got.int() - whole.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 0.01, (diff.max(), diff.float().mean())
    # and reading the manifest's orientation or the file's EXIF gives the same window
    again, _ = DaliDecoder(8, 1, device_id=None).decode_batch(datas, crops)
    assert torch.equal(again, got)


def test_dali_window_holds_the_box_and_the_filter_reach_and_no_more():
    from aimv2data.loader.decode_dali import PAD, slice_window
    from aimv2data.loader.geometry import Crop

    crop = Crop((100.5, 50.0, 420.5, 290.0), (1000, 800), (224, 224))          # 1.43 / 1.07 px per output px
    (x0, y0), (x1, y1), roi_start, roi_end = slice_window(crop, (1000, 800))
    reach_x, reach_y = 2 * 320 / 224 + PAD, 2 * 240 / 224 + PAD
    assert x0 <= 100.5 - reach_x < x0 + 1 and x1 - 1 < 420.5 + reach_x <= x1
    assert y0 <= 50 - reach_y < y0 + 1 and y1 - 1 < 290 + reach_y <= y1
    assert (x1 - x0) * (y1 - y0) < 0.15 * 1000 * 800                           # a sixth of the image decoded
    assert roi_start == (50 - y0, 100.5 - x0) and roi_end == (290 - y0, 420.5 - x0)
    whole = Crop((0.0, 0.0, 1000.0, 800.0), (1000, 800), (56, 42))
    assert slice_window(whole, (1000, 800))[:2] == ((0, 0), (1000, 800))     # clamped to the image


def test_dali_buffers_are_sized_for_the_largest_batch(photos):
    loader = Loader(photos, decoder="dali", native_res=True, batch_patches=4096, seed=0, mix="rows")
    next(iter(loader))
    dec = loader.maker.decoder
    assert dec.max_batch == 4096 // 128                                         # C / 128 images at the smallest area
    dec_hints, out_hints = dec.hints()
    assert out_hints["bytes_per_sample_hint"] * dec.max_batch >= 4096 * 14 * 14 * 3   # the step's uint8 pixels
    assert dec_hints == {}                                                      # CPU: nvJPEG's hints do not apply
    widths, heights = loader.table.width, loader.table.height
    assert dec.max_source == (int(widths.max()), int(heights.max()))
    dec.device = "mixed"                                                        # what a GPU pipeline would be given
    dec_hints, _ = dec.hints()
    assert (dec_hints["preallocate_width_hint"], dec_hints["preallocate_height_hint"]) == dec.max_source
    assert dec_hints["device_memory_padding"] >= 3 * int(widths.max()) * int(heights.max())


def test_dali_gpu_copy_runs_on_its_own_stream_and_ends_before_the_next_run(monkeypatch):
    """The mixed pipeline's hand-over, with a stand-in for torch.cuda (no GPU here): each output is copied on
    the decoder's own stream, that copy's event is waited for before the images are returned (so the next
    run(), which may reuse DALI's output buffer, never overlaps a copy in flight, and the trainer's stream
    never waits on DALI), and the copy is recorded on the consumer's stream for the caching allocator."""
    import contextlib

    import numpy as np

    from _loader_fixtures import encode_jpeg, make_image
    from aimv2data.loader.decode_dali import DaliDecoder, DeviceCopy
    from aimv2data.loader.geometry import cover

    log = []

    class Event:
        def __init__(self, n):
            self.n = n

        def synchronize(self):
            log.append(("wait", self.n))

    class Stream:
        def __init__(self, name):
            self.name = name

        def record_event(self):
            n = sum(1 for e in log if e[0] == "copy")
            log.append(("event", self.name, n))
            return Event(n)

    class Cuda:
        Stream = staticmethod(lambda device: Stream("decoder"))
        default_stream = staticmethod(lambda device: Stream("consumer"))

        @staticmethod
        @contextlib.contextmanager
        def stream(s):
            log.append(("enter", s.name))
            yield
            log.append(("exit", s.name))

    def feed(t, res, cuda_stream):
        log.append(("copy", cuda_stream.name))
        res.copy_(torch.from_numpy(np.array(t)))

    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: log.append(("record", s.name)), raising=False)
    rng = np.random.default_rng(0)
    datas = [encode_jpeg(make_image(90, 60, rng)) for _ in range(3)]
    crops = [cover(90, 60, 42, 28)] * 3
    dec = DaliDecoder(max_batch=4, device_id=None)
    want, _ = dec.decode_batch(datas, crops)
    dec._copy = DeviceCopy(torch.device("cpu"), cuda=Cuda, feed=feed)
    run = dec.pipe.run

    def checked_run():
        copies = [e for e in log if e[0] == "copy"]
        assert sum(1 for e in log if e[0] == "wait") == len(copies), log      # no copy still in flight
        return run()

    dec.pipe.run = checked_run
    for _ in range(3):
        got, failed = dec.decode_batch(datas, crops)
        assert failed == {} and torch.equal(got, want)
    assert log[:6] == [("enter", "decoder"), ("copy", "decoder"), ("event", "decoder", 1), ("exit", "decoder"),
                       ("wait", 1), ("record", "consumer")]
    assert len(log) == 18
