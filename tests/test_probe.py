"""`aimv2 probe`: the attentive-pooling head, the lr x wd sweep, the feature cache, labelled data sets
(image folders, manifests with a label column) and the command, on small generated image sets."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import _probe_fixtures as fx  # noqa: E402

from aimv2train.model.config import model_config  # noqa: E402
from aimv2train.model.encoder import Encoder  # noqa: E402
from aimv2train.model.interop import save_encoder  # noqa: E402
from aimv2train.model.preprocess import to_tensor  # noqa: E402
from aimv2train.eval.probe import (AttentionPoolingHead, ProbeConfig, ProbeJob, Standardize, SweepData,  # noqa: E402
                              run_probe, train_sweep)
from aimv2train.eval.probe_data import (Features, Preprocess, ProbeDataError, encode, image_folder,  # noqa: E402
                                   manifest_set, open_dataset)
from cli.main import main  # noqa: E402

torch.set_num_threads(1)


def _random_trunk(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_encoder(Encoder(model_config("tiny", img_size=fx.SIZE).encoder), path)


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    return fx.make_image_folder(tmp_path_factory.mktemp("colour"), n_train=8, n_val=6, kind="colour")


@pytest.fixture(scope="module")
def random_trunk(tmp_path_factory):
    return _random_trunk(tmp_path_factory.mktemp("trunk") / "random.pt")


# ------------------------------------------------------------------------------------------ the head

def _reference_pool(head: AttentionPoolingHead, x, mask):
    """The textbook form: project every token to k and v, one query per head, torch SDPA."""
    return head.pool_sdpa(x, mask)


@pytest.mark.parametrize("queries", [1, 3])
def test_attention_pooling_equals_sdpa_over_projected_tokens(queries):
    """The reordered computation (never projecting every token) is the same function with the same
    gradients as k/v projections + SDPA, padding mask included."""
    torch.manual_seed(0)
    head = AttentionPoolingHead(64, 5, heads=4, queries=queries).double()
    with torch.no_grad():
        head.query.normal_()  # a non-trivial query, so the softmax is far from uniform
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] * 1 + [False] * 6])
    for m in (None, mask):
        ours, ref = head.pool(x, m), _reference_pool(head, x, m)
        assert (ours - ref).abs().max() < 1e-12
        g1 = torch.autograd.grad(ours.square().sum(), list(head.parameters())[:3])
        g2 = torch.autograd.grad(_reference_pool(head, x, m).square().sum(), list(head.parameters())[:3])
        assert all((a - b).abs().max() < 1e-12 for a, b in zip(g1, g2))


def test_padding_does_not_change_a_prediction():
    """Native resolution pads images of smaller grids: the padded tokens must be invisible."""
    torch.manual_seed(0)
    head = AttentionPoolingHead(64, 4, heads=2)
    short = torch.randn(1, 5, 64)
    padded = torch.cat([short, 100 * torch.randn(1, 3, 64)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    assert torch.allclose(head(short), head(padded, mask), atol=1e-6)
    assert not torch.allclose(head(short), head(padded), atol=1e-3)


# ------------------------------------------------------------------------------------------ the sweep

def _toy_features(seed=0, n=48, classes=3):
    """Tokens whose class is written into one channel of every token, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 6, 16, generator=g)
    x[torch.arange(n), :, y] += 2.0
    return x, y.numpy()


def _toy_sweep(cfg, **kw):
    x, y = _toy_features()
    xv, yv = _toy_features(seed=1, n=30)
    flat = x.reshape(-1, 16).double()
    data = SweepData(lambda i: (x[i], None), y, lambda i: (xv[i], None), yv)
    return train_sweep("attentive", lambda: AttentionPoolingHead(16, 3, heads=2), Standardize(flat.mean(0).numpy(),
                       flat.var(0).numpy()), data, cfg, progress=False, **kw)


def test_sweep_heads_train_independently():
    """One joint sweep over 3 settings gives each setting exactly what training it alone gives: the
    heads share batches but no gradients, clipping or schedule."""
    cfg = ProbeConfig(lrs=(1e-3, 1e-2, 3e-1), wds=(0.05,), epochs=6, batch_size=16, warmup_epochs=1, seed=3)
    joint = _toy_sweep(cfg).results
    for lr, r in zip(cfg.lrs, joint):
        alone = _toy_sweep(ProbeConfig(lrs=(lr,), wds=(0.05,), epochs=6, batch_size=16, warmup_epochs=1,
                                       seed=3)).results[0]
        assert alone["top1"] == r["top1"]
        assert alone["train_loss"] == pytest.approx(r["train_loss"], rel=1e-6)
    assert len({r["train_loss"] for r in joint}) == 3  # the settings really differ
    best = max(joint, key=lambda r: r["top1"])
    assert best["top1"] > 100 / 3 + 30  # the toy task is learnable


def test_sweep_resumes_to_the_same_result(tmp_path):
    """Killed after epoch 3 with a checkpoint every epoch, then rerun: the same numbers as straight through."""
    cfg = ProbeConfig(lrs=(1e-2, 5e-2), wds=(0.05, 0.1), epochs=6, batch_size=16, warmup_epochs=1)
    straight = _toy_sweep(cfg)
    x, y = _toy_features()
    xv, yv = _toy_features(seed=1, n=30)
    calls = {"n": 0}

    def dying(i):
        calls["n"] += 1
        if calls["n"] > 3 * 3:  # 48 images / 16 = 3 steps per epoch
            raise KeyboardInterrupt
        return x[i], None

    flat = x.reshape(-1, 16).double()
    norm = Standardize(flat.mean(0).numpy(), flat.var(0).numpy())
    state = tmp_path / "sweep.pt"
    with pytest.raises(KeyboardInterrupt):
        train_sweep("attentive", lambda: AttentionPoolingHead(16, 3, heads=2), norm,
                    SweepData(dying, y, lambda i: (xv[i], None), yv), cfg, state_path=state, save_every_s=0,
                    progress=False)
    assert state.is_file()
    resumed = _toy_sweep(cfg, state_path=state, save_every_s=0)
    assert resumed.resumed_from_epoch == 3
    assert [r["top1"] for r in resumed.results] == [r["top1"] for r in straight.results]
    assert [r["train_loss"] for r in resumed.results] == pytest.approx([r["train_loss"] for r in straight.results],
                                                                       rel=1e-6)
    assert not state.exists()  # removed once the sweep is done


def test_a_diverging_setting_is_reported_and_the_rest_go_on():
    cfg = ProbeConfig(lrs=(1e-2, 1e30), wds=(0.05,), epochs=3, batch_size=16, warmup_epochs=0)
    res = _toy_sweep(cfg)
    ok, bad = res.results
    assert bad["diverged"] and bad["top1"] is None
    assert not ok["diverged"] and res.best is ok


# ------------------------------------------------------------------------------------------ data sets

def test_image_folder_classes_and_val_check(tmp_path):
    tr, va = fx.make_image_folder(tmp_path, n_train=2, n_val=1)
    ds = image_folder(tr)
    assert ds.classes == sorted(fx.CLASSES) and ds.counts() == {c: 2 for c in fx.CLASSES}
    assert [Path(it.name).parent.name for it in ds.items] == [ds.classes[it.label] for it in ds.items]
    (va / "zebra").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(va / "zebra" / "z.png")
    with pytest.raises(ProbeDataError, match="zebra.*not in the training set"):
        open_dataset(va, classes=ds.classes)
    (tr / "empty").mkdir()  # a class folder with no images is not a class
    assert image_folder(tr).classes == ds.classes
    with pytest.raises(ProbeDataError, match="no class folders"):
        open_dataset(tr / "empty")


def test_encode_caches_resumes_and_names_bad_images(tmp_path, random_trunk):
    from aimv2train.model.interop import load_encoder

    tr, _ = fx.make_image_folder(tmp_path / "d", n_train=5, n_val=1)
    (tr / "vertical" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = image_folder(tr)
    enc = load_encoder(random_trunk)
    prep = Preprocess(resolution=fx.SIZE)
    rep = encode(enc, ds, tmp_path / "cache", prep, part_size=8, progress=False)
    assert rep.images == 20 and rep.encoded_now == 21
    assert [s["name"] for s in rep.skipped] == [str(tr / "vertical" / "broken.png")]
    assert "UnidentifiedImageError" in rep.skipped[0]["reason"]
    f = Features(rep.cache)
    assert len(f) == 20 and f.uniform and f.lengths[0] == 16 and f.dim == 64
    # the cached tokens are the encoder's, image by image (float16 storage)
    with torch.no_grad():
        direct = enc(to_tensor(Image.open(f.rows[7]).convert("RGB"))[None])[0]
    x, mask = f.batch(np.array([7]))
    assert mask is None and (x[0] - direct).abs().max() < 2e-3
    assert np.abs(f.pooled[7] - direct.mean(0).numpy()).max() < 1e-6  # pooled in float32
    # too big for RAM: the parts stay memory-mapped and give the same batches
    mapped, idx = Features(rep.cache, in_memory_bytes=0), np.array([19, 0, 8, 7])
    assert len(mapped._tok) == 3 and torch.equal(mapped.batch(idx)[0], f.batch(idx)[0])
    assert np.allclose(mapped.token_stats()[0], f.token_stats()[0])
    # a second call finds everything
    again = encode(enc, ds, tmp_path / "cache", prep, part_size=8, progress=False)
    assert again.cache == rep.cache and again.encoded_now == 0
    # interrupted after two of three parts: only the missing part is encoded again
    for suffix in (".json", ".tokens.npy", ".pooled.npy"):
        (rep.cache / f"part_00002{suffix}").unlink()
    (rep.cache / "complete.json").unlink()
    resumed = encode(enc, ds, tmp_path / "cache", prep, part_size=8, progress=False)
    assert resumed.encoded_now == 5 and np.array_equal(Features(resumed.cache).pooled, f.pooled)
    # other weights or other preprocessing: another cache entry
    other = encode(load_encoder(_random_trunk(tmp_path / "r1.pt", seed=1)), ds, tmp_path / "cache", prep,
                   part_size=8, progress=False)
    assert other.cache != rep.cache
    assert encode(enc, ds, tmp_path / "cache", Preprocess(resolution=28), progress=False).cache != rep.cache


def test_native_resolution_features_pad_and_mask(tmp_path):
    """Images of different aspect ratios keep their own grids; batches pad them and say which tokens are real."""
    from aimv2train.model.interop import load_encoder

    torch.manual_seed(0)
    cfg = model_config("tiny", pos_embed="sincos").encoder
    enc = Encoder(cfg).eval()
    for c, (w, h) in (("a", (56, 28)), ("b", (28, 70))):
        (tmp_path / "d" / c).mkdir(parents=True)
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "d" / c / "x.png")
    save_encoder(enc, tmp_path / "native.pt")
    rep = encode(load_encoder(tmp_path / "native.pt"), image_folder(tmp_path / "d"), tmp_path / "cache",
                 Preprocess(max_patches=64), progress=False)
    f = Features(rep.cache)
    assert f.grids == [(2, 4), (5, 2)] and not f.uniform
    x, mask = f.batch(np.array([0, 1]))
    assert x.shape == (2, 10, 64) and mask.sum(1).tolist() == [8, 10]
    assert x[0, 8:].abs().sum() == 0
    xm, mm = Features(rep.cache, in_memory_bytes=0).batch(np.array([0, 1]))
    assert torch.equal(xm, x) and torch.equal(mm, mask)
    # the whole probe on a sin-cos trunk defaults to native resolution and trains on the padded batches
    r = run_probe(ProbeJob(str(tmp_path / "native.pt"), str(tmp_path / "d"), str(tmp_path / "d"),
                           max_patches=64, cache_dir=str(tmp_path / "cache"), progress=False),
                  ProbeConfig(lrs=(1e-2,), wds=(0.1,), epochs=20, batch_size=2, warmup_epochs=0), log=lambda *a: None)
    assert r["preprocess"] == {"mode": "native", "resolution": None, "max_patches": 64}
    assert r["train"]["tokens_per_image"] == [8, 10] and r["attentive"]["best"]["top1"] == 100.0


def test_manifest_with_label_column(tmp_path, random_trunk):
    """A manifest (webdataset tar indexed by `aimv2 shard`) plus a label column: rows are read by offset
    from the tar; a null label is dropped and named; labels map onto the training set's classes."""
    from aimv2train.model.interop import load_encoder

    manifest = fx.make_manifest(tmp_path, n=3)
    ds = manifest_set(manifest)
    assert ds.classes == sorted(fx.CLASSES) and len(ds.items) == 11
    assert len(ds.dropped) == 1 and ds.dropped[0][1] == "null label"
    with pytest.raises(ProbeDataError, match="no label column 'species'"):
        manifest_set(manifest, "species")
    enc = load_encoder(random_trunk)
    rep = encode(enc, ds, tmp_path / "cache", Preprocess(resolution=fx.SIZE), progress=False)
    f = Features(rep.cache)
    images = fx.samples(3, seed=3)  # what make_manifest wrote, key i = image i
    for row, (name, label) in enumerate(zip(f.rows, f.labels)):
        cls, img = images[int(name.rsplit(":", 1)[1])]
        assert ds.classes[label] == cls
        with torch.no_grad():
            want = enc(to_tensor(Image.fromarray(img))[None])[0].mean(0).numpy()
        assert np.abs(f.pooled[row] - want).max() < 1e-5


# ------------------------------------------------------------------------------------------ end to end

def test_probe_command_on_colour_classes(colour_data, random_trunk, tmp_path):
    """The command end to end: the sweep's table of results, the best as JSON on the last stdout line and
    in --output, features from the cache on a rerun with identical results. Colour classes: the label is
    in the mean colour, so even a random trunk's features carry it: the probe must find it."""
    tr, va = colour_data
    args = ["probe", "-c", str(random_trunk), "--train", str(tr), "--val", str(va), "--lrs", "1e-3,1e-2",
            "--wds", "0.05,0.1", "--epochs", "30", "--batch-size", "16", "--warmup-epochs", "2",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-o", str(tmp_path / "probe.json")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == json.loads((tmp_path / "probe.json").read_text())
    assert out["classes"] == sorted(fx.COLOURS) and out["chance_top1"] == 25.0
    assert out["train"]["images"] == 32 and out["val"]["images"] == 24
    for kind in ("attentive", "linear"):
        rs = out[kind]["results"]
        assert [(r["lr"], r["wd"]) for r in rs] == [(1e-3, 0.05), (1e-3, 0.1), (1e-2, 0.05), (1e-2, 0.1)]
        assert out[kind]["best"] == max(rs, key=lambda r: r["top1"])
        assert out[kind]["best"]["top1"] >= 90.0
    rerun = CliRunner().invoke(main, args)
    again = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert "features from the cache" in rerun.stderr
    for kind in ("attentive", "linear"):
        assert again[kind]["results"] == out[kind]["results"]


def test_probe_command_errors(colour_data, random_trunk, tmp_path):
    tr, va = colour_data
    base = ["probe", "-c", str(random_trunk), "--train", str(tr), "--val", str(va), "--cache-dir", str(tmp_path)]
    res = CliRunner().invoke(main, base + ["--resolution", "56", "--native-res"])
    assert res.exit_code != 0 and "exclusive" in res.output
    res = CliRunner().invoke(main, base + ["--lrs", "fast"])
    assert res.exit_code != 0 and "expected numbers" in res.output
    res = CliRunner().invoke(main, base + ["--resolution", "50"])
    assert res.exit_code != 0 and "not a multiple of the patch size 14" in res.output


@pytest.mark.slow
def test_trained_trunk_beats_random_trunks(tmp_path):
    """The issue's yardstick. The real trainer runs 600 steps (tiny model, 56 px) on 400 fresh texture
    images whose alt-text names the texture; then both probes on its frozen trunk vs on two randomly
    initialised trunks, on 20 / 25 images per class (train / val) not seen in training.

    Measured when written: trained attentive 77-80 %, linear 72-74 %; random trunks attentive 35-55 %,
    linear 26-35 % (chance 25 %). With the colour of every image drawn at random, mean colour says nothing
    and a random trunk's features are weak, so the margins below are wide and not a matter of luck."""
    tr, va = fx.make_image_folder(tmp_path / "data", n_train=20, n_val=25)
    run = fx.trained_trunk(tmp_path / "pretrain", steps=600, n_per_class=100)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["step"] == 600
    cfg = ProbeConfig(lrs=(3e-3, 1e-2), wds=(0.05,), epochs=100, batch_size=32, warmup_epochs=0)

    def best(ckpt):
        r = run_probe(ProbeJob(str(ckpt), str(tr), str(va), cache_dir=str(tmp_path / "cache"), progress=False),
                      cfg, log=lambda *a: None)
        return r["attentive"]["best"]["top1"], r["linear"]["best"]["top1"]

    trained = best(run)
    randoms = [best(_random_trunk(tmp_path / f"random{s}.pt", seed=s)) for s in (0, 1)]
    att, lin = trained
    assert att >= 60.0 and lin >= 55.0  # chance: 25 %
    assert att >= max(r[0] for r in randoms) + 10.0
    assert lin >= max(r[1] for r in randoms) + 20.0
