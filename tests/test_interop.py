"""Weight interop: transformers Aimv2VisionModel (both ways, fixed and native resolution), ml-aim keys,
our checkpoints and trainer checkpoints. Models are random, built from configs: no hub."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from aimv2train.model.config import EncoderConfig, model_config
from aimv2train.model.encoder import Encoder
from aimv2train.eval.weights import load_weights
from aimv2train.model.interop import (hf_config, infer_encoder_config, load_encoder, save_aim, save_encoder,
                                save_hf, to_aim_state_dict)
from aimv2train.model.aimv2 import AIMv2

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
TOL = 1e-5


def _hf_model(native: bool, use_head: bool = False):
    """A random Aimv2VisionModel whose every weight (norms and patch bias included) is non-trivial, so a
    swapped or dropped tensor cannot hide behind an all-ones or all-zeros init."""
    cfg = transformers.Aimv2VisionConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                         num_attention_heads=4, image_size=56, patch_size=14,
                                         use_head=use_head, is_native=native)
    torch.manual_seed(1)
    model = transformers.Aimv2VisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rms_norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _pixels(native: bool):
    torch.manual_seed(2)
    return torch.randn(2, 3, 3 * 14, 6 * 14) if native else torch.randn(2, 3, 56, 56)  # 3x6: non-square


@pytest.mark.parametrize("native", [False, True], ids=["fixed-res", "native"])
def test_hf_to_ours_parity(tmp_path, native):
    hf = _hf_model(native)
    hf.save_pretrained(tmp_path / "hf")
    enc = load_encoder(tmp_path / "hf")
    assert enc.cfg.pos_embed == ("sincos" if native else "learned")
    assert (enc.cfg.dim, enc.cfg.depth, enc.cfg.heads, enc.cfg.mlp_hidden) == (64, 3, 4, 160)
    x = _pixels(native)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        ours = enc(x)
    assert ours.shape == ref.shape == (2, 18 if native else 16, 64)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("native", [False, True], ids=["fixed-res", "native"])
def test_ours_to_hf_parity_and_clean_load(tmp_path, native):
    torch.manual_seed(3)
    enc = Encoder(EncoderConfig(dim=64, depth=3, heads=4, img_size=56,
                                pos_embed="sincos" if native else "learned")).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    save_hf(enc, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    hf, info = transformers.Aimv2VisionModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.is_native is native and hf.config.use_head is False
    x = _pixels(native)
    with torch.no_grad():
        diff = (hf.eval()(pixel_values=x).last_hidden_state - enc(x)).abs().max().item()
    assert diff <= TOL


def test_hf_pooling_head_is_dropped_with_a_warning(tmp_path):
    hf = _hf_model(native=False, use_head=True)
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="not part of the encoder"):
        enc = load_encoder(tmp_path / "hf")
    x = _pixels(False)
    with torch.no_grad():
        assert (hf(pixel_values=x).last_hidden_state - enc(x)).abs().max().item() <= TOL


def test_ml_aim_keys_and_round_trip(tmp_path):
    torch.manual_seed(4)
    enc = Encoder(EncoderConfig(dim=64, depth=2, heads=2, img_size=56)).eval()
    path = save_aim(enc, tmp_path / "aim.safetensors")
    sd = load_file(path)
    expected = {"preprocessor.patchifier.proj.weight", "preprocessor.patchifier.proj.bias",
                "preprocessor.patchifier.norm.weight", "preprocessor.pos_embed", "trunk.post_trunk_norm.weight"}
    for i in range(2):
        expected |= {f"trunk.blocks.{i}.{k}.weight" for k in
                     ("norm_1", "attn.qkv", "attn.proj", "norm_2", "mlp.fc1", "mlp.fc2", "mlp.fc3")}
    assert set(sd) == expected
    assert sd["preprocessor.pos_embed"].shape == (1, 16, 64)
    assert sd["trunk.blocks.0.attn.qkv.weight"].shape == (192, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor is used: nothing reported as dropped
        back = load_encoder(path)  # heads come back from the file's metadata
    assert back.cfg == enc.cfg
    for k, v in enc.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_bare_ml_aim_state_dict(tmp_path):
    """An ml-aim .pth as Apple's loaders produce: plain state dict, no config, possibly an eval head."""
    torch.manual_seed(5)
    enc = Encoder(EncoderConfig(dim=256, depth=2, heads=2, pos_embed="sincos")).eval()
    sd = to_aim_state_dict(enc.state_dict(), 2)
    sd["head.k.weight"] = torch.randn(256, 256)
    torch.save(sd, tmp_path / "aim.pth")
    with pytest.warns(UserWarning, match="not part of the encoder"):
        back = load_encoder(tmp_path / "aim.pth")
    assert back.cfg.heads == 2 and back.cfg.pos_embed == "sincos"  # 256 wide / head dim 128
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        torch.testing.assert_close(back(x), enc(x), rtol=0, atol=0)
    save_file(to_aim_state_dict(Encoder(EncoderConfig(dim=64, depth=1, heads=2)).state_dict(), 1),
              tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match="pass heads="):
        load_encoder(tmp_path / "narrow.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_encoder(tmp_path / "narrow.safetensors", heads=2).cfg.heads == 2


def test_trainer_checkpoint_directory(tmp_path):
    """A run directory whose checkpoints hold the full AIMv2 model under "model" (DDP/compile prefixes
    stripped); the newest zero-padded step is taken."""
    torch.manual_seed(6)
    cfg = model_config("tiny", pos_embed="sincos")
    model = AIMv2(cfg).eval()
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    old = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.save({"model": old, "config": cfg.to_dict(), "step": 10}, ckpts / "step_00000010.pt")
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "config": cfg.to_dict(), "step": 20,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3}]}}, ckpts / "step_00000020.pt")
    (ckpts / ".step_00000030.pt").write_bytes(b"half-written")  # a save in progress is not picked
    enc = load_weights(tmp_path / "run")  # a run resolves to its newest checkpoint (train/checkpoint.py)
    x = torch.randn(1, 3, 42, 70)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), model.encoder(x), rtol=0, atol=0)


def test_our_encoder_checkpoint_round_trip(tmp_path):
    enc = Encoder(EncoderConfig(dim=64, depth=2, heads=4, img_size=28)).eval()
    save_encoder(enc, tmp_path / "enc.pt")
    back = load_encoder(tmp_path / "enc.pt")
    assert back.cfg == enc.cfg  # heads from the stored config, not guessed
    assert all(torch.equal(back.state_dict()[k], v) for k, v in enc.state_dict().items())


def test_infer_config_from_shapes():
    enc = Encoder(EncoderConfig(dim=128, depth=3, heads=1, img_size=42, mlp_hidden=96))
    cfg = infer_encoder_config(enc.state_dict())
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.img_size, cfg.mlp_hidden, cfg.pos_embed) == (
        128, 3, 1, 42, 96, "learned")


def test_hf_config_fields_are_what_transformers_reads():
    cfg = hf_config(EncoderConfig(dim=1024, depth=24, heads=8, pos_embed="sincos"))
    parsed = transformers.Aimv2VisionConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "dtype")})
    defaults = transformers.Aimv2VisionConfig()  # Apple's aimv2-large-patch14-224
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "patch_size", "rms_norm_eps", "qkv_bias", "mlp_bias"):
        assert getattr(parsed, field) == getattr(defaults, field), field
    assert parsed.is_native is True


def test_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "missing.pt")
    torch.save({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unrecognised weights"):
        load_encoder(tmp_path / "odd.pt")
    sd = to_aim_state_dict(Encoder(EncoderConfig(dim=128, depth=2, heads=1)).state_dict(), 2)
    del sd["trunk.blocks.1.mlp.fc2.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="'trunk.blocks.1.mlp.fc2.weight' is missing"):
        load_encoder(tmp_path / "partial.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder(tmp_path / "empty")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="not an AIMv2 model"):
        load_encoder(tmp_path / "hf")
