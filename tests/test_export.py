"""`aimv2 export`: a trainer run -> a transformers Aimv2VisionModel folder or ml-aim keyed safetensors, with
a model card; the exported weights give `aimv2 embed`'s features and go back into `aimv2 train --init`."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))
import _probe_fixtures as fx  # noqa: E402

from aimv2train.model.config import model_config  # noqa: E402
from aimv2train.model.encoder import Encoder  # noqa: E402
from aimv2train.eval.weights import load_weights  # noqa: E402
from aimv2train.model.interop import load_encoder, save_encoder, to_aim_state_dict  # noqa: E402
from aimv2train.model.preprocess import fixed_resolution, load_rgb, native_resolution  # noqa: E402
from aimv2train.eval.probe_data import encoder_hash  # noqa: E402
from cli.main import main  # noqa: E402

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
TOL = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real trainer run: tiny model, 56 px, 20 steps, checkpoints at steps 10 and 20."""
    from aimv2data.manifest.build import build_manifest
    from aimv2train.train.tokenizer import train_tokenizer
    from aimv2train.train.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("export_run")
    tar = fx.write_tar(root / "shards" / "00000.tar", fx.samples(8, seed=5))
    build_manifest([str(tar)], root / "manifest", progress=False)
    train_tokenizer(root / "manifest", root / "tok.model", vocab_size=64, soft_limit=True)
    train(TrainConfig(manifest=str(root / "manifest"), tokenizer=str(root / "tok.model"), out=str(root / "run"),
                      model="tiny", steps=20, resolution=fx.SIZE, batch_size=8, workers=0, save_every=10, keep=0,
                      progress=False, peak_flops=1e11, seed=0))
    return root / "run"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four texture images and one non-square photo-like image (resized and centre-cropped by both sides)."""
    d = tmp_path_factory.mktemp("images")
    for i, (_, img) in enumerate(fx.samples(1, seed=9)):
        Image.fromarray(img).save(d / f"{i}.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)).save(d / "wide.jpg", quality=90)
    return sorted(d.iterdir())


def _export(*args):
    res = CliRunner().invoke(main, ["export", *map(str, args)])
    return res


def _embed(checkpoint, images, out, *extra):
    res = CliRunner().invoke(main, ["embed", *map(str, images), "-c", str(checkpoint), "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return np.load(out) if str(out).endswith(".npy") else np.load(out)


def test_hf_export_loads_in_transformers_and_matches_embed(run, images, tmp_path):
    res = _export(run, "--format", "hf", "-o", tmp_path / "hf")
    assert res.exit_code == 0, res.output
    out = tmp_path / "hf"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "preprocessor_config.json"]
    model, info = transformers.Aimv2VisionModel.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model.eval()
    # aimv2 embed on the run's newest checkpoint: every token, and the mean-pooled features
    tokens = _embed(run / "checkpoints", images, tmp_path / "tok.npy", "--tokens")
    pooled = _embed(run / "checkpoints", images, tmp_path / "pool.npy")
    assert tokens.shape == (5, 16, 64)
    pixels = torch.stack([fixed_resolution(load_rgb(p), fx.SIZE) for p in images])
    with torch.no_grad():
        hf = model(pixel_values=pixels).last_hidden_state.numpy()
    assert np.abs(hf - tokens).max() <= TOL
    assert np.abs(hf.mean(1) - pooled).max() <= TOL
    # the folder's image processor loads offline; on an image already at the input size it is our preprocessing
    proc = transformers.AutoImageProcessor.from_pretrained(out)
    theirs = proc(images=Image.open(images[0]).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert np.abs(theirs.numpy() - pixels[:1].numpy()).max() < 1e-4
    # and `aimv2 embed` reads the exported folder back to the same features
    again = _embed(out, images, tmp_path / "again.npy", "--tokens")
    assert np.abs(again - tokens).max() <= TOL


def test_aim_export_has_ml_aim_keys_and_round_trips(run, tmp_path):
    res = _export(run, "--format", "aim", "-o", tmp_path / "aim")
    assert res.exit_code == 0, res.output
    out = tmp_path / "aim"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]
    enc = load_weights(run / "checkpoints")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    want = to_aim_state_dict({k: v for k, v in enc.state_dict().items()}, enc.cfg.depth)
    assert keys == set(want) and "trunk.blocks.1.attn.qkv.weight" in keys and "preprocessor.pos_embed" in keys
    assert json.loads(meta["aimv2.encoder_config"])["dim"] == 64
    back = load_encoder(out)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in enc.state_dict().items())
    card = (out / "README.md").read_text()
    assert "ml-aim `AIMv2VisionEncoder` keys" in card and "library_name: ml-aim" in card


def test_card_names_data_steps_and_probe_results(run, tmp_path):
    """The card says what the encoder was trained on and for how long, and quotes the probe: found in
    RUN/probe.json, or given; results for other weights are flagged as such."""
    from aimv2train.eval.probe import ProbeConfig, ProbeJob, run_probe, write_results

    tr, va = fx.make_image_folder(tmp_path / "data", n_train=3, n_val=2, kind="colour")
    results = run_probe(ProbeJob(str(run), str(tr), str(va), cache_dir=str(tmp_path / "cache"), progress=False),
                        ProbeConfig(lrs=(1e-2,), wds=(0.05,), epochs=3, batch_size=8, warmup_epochs=0),
                        log=lambda *a: None)
    probe_path = write_results(results, run / "probe.json")
    try:
        res = _export(run, "--format", "hf", "-o", tmp_path / "hf")
        assert res.exit_code == 0, res.output
        card = (tmp_path / "hf" / "README.md").read_text()
        manifest = json.loads((run / "run.json").read_text())["train"]["manifest"]
        assert "after **20 optimiser steps** of 20 (run status: done)" in card
        assert f"manifest `{manifest}`" in card and "**32 image-text samples** (probe: 32)" in card
        assert "stage `pretrain`, 56 px, 8 images per rank per step" in card
        best = results["attentive"]["best"]["top1"]
        assert f"From `{probe_path}`\n" in card and f"**{best:.2f}%**" in card and "different weights" not in card
        assert "shortened from Table A2" in card
        # the same results quoted for the step-10 weights: flagged
        res = _export(run, "--format", "hf", "--step", "10", "-o", tmp_path / "hf10")
        card10 = (tmp_path / "hf10" / "README.md").read_text()
        assert "after **10 optimiser steps** of 20" in card10
        assert "**these results are for different weights**" in card10
        # files listed with their hashes
        import hashlib
        sha = hashlib.sha256((tmp_path / "hf" / "model.safetensors").read_bytes()).hexdigest()
        assert f"| model.safetensors | `{sha}` |" in card
    finally:
        probe_path.unlink()
    res = _export(run, "--format", "aim", "-o", tmp_path / "noprobe")
    assert "No probe results were given" in (tmp_path / "noprobe" / "README.md").read_text()


def test_step_selection_overwrite_and_errors(run, tmp_path):
    res = _export(run, "--format", "hf", "--step", "10", "-o", tmp_path / "s10")
    assert res.exit_code == 0, res.output
    step10 = torch.load(run / "checkpoints" / "step_00000010.pt", weights_only=True)["model"]
    back = load_encoder(tmp_path / "s10").state_dict()
    assert all(torch.equal(back[k], step10[f"encoder.{k}"]) for k in back)
    assert not all(torch.equal(back[k], load_weights(run / "checkpoints").state_dict()[k]) for k in back)

    res = _export(run, "--format", "hf", "--step", "7", "-o", tmp_path / "s7")
    assert res.exit_code != 0 and "no checkpoint for step 7; it has steps [10, 20]" in res.output
    assert not (tmp_path / "s7").exists()
    # a non-empty output is kept unless --overwrite, and then replaced whole
    res = _export(run, "--format", "aim", "-o", tmp_path / "s10")
    assert res.exit_code != 0 and "not empty" in res.output
    assert (tmp_path / "s10" / "config.json").is_file()
    res = _export(run, "--format", "aim", "-o", tmp_path / "s10", "--overwrite")
    assert res.exit_code == 0 and sorted(p.name for p in (tmp_path / "s10").iterdir()) == ["README.md",
                                                                                       "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    empty = tmp_path / "emptyrun" / "checkpoints"
    empty.mkdir(parents=True)
    (tmp_path / "emptyrun" / "run.json").write_text("{}")
    res = _export(tmp_path / "emptyrun", "--format", "hf", "-o", tmp_path / "x")
    assert res.exit_code != 0 and "without checkpoints" in res.output


def test_native_resolution_export_matches_embed(images, tmp_path):
    """A sin-cos (native-resolution) encoder: the HF folder says is_native, has no fixed-size image
    processor, and gives `aimv2 embed --native-res`'s tokens for a non-square image."""
    torch.manual_seed(0)
    enc = Encoder(model_config("tiny", pos_embed="sincos").encoder)
    ckpt = save_encoder(enc, tmp_path / "native.pt")
    res = _export(ckpt, "--format", "hf", "-o", tmp_path / "hf")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["is_native"] is True
    assert not (tmp_path / "hf" / "preprocessor_config.json").exists()
    assert "Converted from" in (tmp_path / "hf" / "README.md").read_text()
    model = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "hf").eval()
    wide = [p for p in images if p.name == "wide.jpg"]
    npz = _embed(ckpt, wide, tmp_path / "f.npz", "--native-res", "--tokens", "--max-patches", "64")
    x = native_resolution(load_rgb(wide[0]), 64)[None]
    assert x.shape[2:] != x.shape[:1] and x.shape[2] != x.shape[3]
    with torch.no_grad():
        hf = model(pixel_values=x).last_hidden_state[0].numpy()
    assert hf.shape == npz["tokens_00000"].shape and np.abs(hf - npz["tokens_00000"]).max() <= TOL
    assert encoder_hash(load_encoder(tmp_path / "hf")) == encoder_hash(enc.eval())


@pytest.mark.parametrize("fmt", ["hf", "aim"])
def test_exported_weights_initialise_training(run, tmp_path, fmt):
    """The documented hand-off back: `aimv2 train --init EXPORTED` (what an apple/aimv2-* download
    also goes through) loads exactly the exported encoder; the decoder starts fresh."""
    from aimv2train.train.tokenizer import Tokenizer
    from aimv2train.train.trainer import TrainConfig, build_model, load_init

    res = _export(run, "--format", fmt, "-o", tmp_path / fmt)
    assert res.exit_code == 0, res.output
    root = run.parent
    cfg = TrainConfig(manifest=str(root / "manifest"), tokenizer=str(root / "tok.model"), out=str(tmp_path / "r"),
                      resolution=fx.SIZE, seed=1)
    model = build_model(cfg, Tokenizer(cfg.tokenizer), fx.SIZE)
    note = load_init(model, str(tmp_path / fmt))
    assert "encoder only" in note and "decoder and heads" in note
    want = load_weights(run / "checkpoints").state_dict()
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in want.items())


def test_apple_remote_code_folder_loads_and_exports(tmp_path):
    """Apple's original hub folders are remote-code (`model_type: aimv2`, the encoder's fields at the top
    level) with ml-aim keyed weights: the folder itself loads, exports and so initialises training."""
    from safetensors.torch import load_file, save_file

    from aimv2train.model.interop import save_aim

    torch.manual_seed(0)
    enc = Encoder(model_config("tiny").encoder).eval()
    hub = tmp_path / "aimv2-tiny-patch14-224"
    save_aim(enc, hub / "model.safetensors")
    save_file(load_file(hub / "model.safetensors"), hub / "model.safetensors", metadata={"format": "pt"})  # no config
    c = enc.cfg
    (hub / "config.json").write_text(json.dumps({
        "architectures": ["AIMv2Model"], "model_type": "aimv2", "auto_map": {"AutoModel": "modeling_aimv2.AIMv2Model"},
        "hidden_size": c.dim, "num_hidden_layers": c.depth, "num_attention_heads": c.heads,
        "intermediate_size": c.mlp_hidden, "patch_size": c.patch_size, "image_size": c.img_size,
        "rms_norm_eps": c.eps, "num_channels": 3, "qkv_bias": False, "use_bias": False}))
    assert encoder_hash(load_encoder(hub)) == encoder_hash(enc)
    res = _export(hub, "--format", "hf", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert encoder_hash(load_encoder(tmp_path / "out")) == encoder_hash(enc)


# ------------------------------------------------- which weights a path names (issue 23 point 7)

@pytest.fixture
def damaged_run(run, tmp_path):
    """A copy of the run whose newest checkpoint (step 20) has random bytes inside (its CRC-32s fail)."""
    import os
    import shutil

    copy = tmp_path / "damaged_run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    newest = copy / "checkpoints" / "step_00000020.pt"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = os.urandom(64)
    newest.write_bytes(bytes(raw))
    return copy


def test_a_damaged_newest_checkpoint_is_skipped_with_a_notice_by_export_and_embed(damaged_run, run, images,
                                                                                   tmp_path, capsys):
    """The run names its newest intact checkpoint (step 10) for export and embed, as for --resume, and
    says which one it skipped; named exactly (the file, --step 20) the damaged checkpoint is refused."""
    from aimv2train.eval.export import export
    from aimv2train.eval.weights import WeightsError

    s = export(damaged_run, "hf", tmp_path / "hf")
    err = capsys.readouterr().err
    assert s["step"] == 10 and "step_00000020.pt is damaged" in err and "using step_00000010.pt" in err
    step10 = torch.load(run / "checkpoints" / "step_00000010.pt", weights_only=True)["model"]
    back = load_encoder(tmp_path / "hf").state_dict()
    assert all(torch.equal(back[k], step10[f"encoder.{k}"]) for k in back)

    res = CliRunner().invoke(main, ["embed", str(images[0]), "-c", str(damaged_run), "-o", str(tmp_path / "e.npy")])
    assert res.exit_code == 0 and "using step_00000010.pt" in res.output, res.output

    for path, step in ((damaged_run / "checkpoints" / "step_00000020.pt", None), (damaged_run, 20)):
        with pytest.raises(WeightsError, match="damaged"):
            export(path, "hf", tmp_path / "refused", step=step)
        assert not (tmp_path / "refused").exists()


def test_a_damaged_newest_checkpoint_is_skipped_with_a_notice_by_train_init(damaged_run, run, tmp_path, capsys):
    """`aimv2 train --init RUN` reads the same checkpoint export does (no longer skipping silently), and
    refuses a damaged checkpoint file named exactly (it used to load it through torch.load unchecked)."""
    from aimv2train.train.tokenizer import Tokenizer
    from aimv2train.train.trainer import TrainConfig, TrainError, build_model, load_init

    root = run.parent
    cfg = TrainConfig(manifest=str(root / "manifest"), tokenizer=str(root / "tok.model"), out=str(tmp_path / "r"),
                      resolution=fx.SIZE, seed=1)
    model = build_model(cfg, Tokenizer(cfg.tokenizer), fx.SIZE)
    note = load_init(model, str(damaged_run))
    err = capsys.readouterr().err
    assert "step_00000010.pt (full model, step 10)" in note
    assert "step_00000020.pt is damaged" in err and "using step_00000010.pt" in err
    with pytest.raises(TrainError, match="--init .*step_00000020.pt is damaged"):
        load_init(model, str(damaged_run / "checkpoints" / "step_00000020.pt"))
