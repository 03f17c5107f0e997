"""Architecture: sizes against the paper, position embeddings, variable grids, checkpointing, FLOPs,
torch.compile with dynamic shapes."""
import copy
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from aimv2train.model.config import ENCODER_PRESETS, PAPER_ENCODER_PARAMS_B, model_config, swiglu_hidden
from aimv2train.model.encoder import Encoder
from aimv2train.model.flops import encoder_train_flops, step_flops
from aimv2train.model.aimv2 import AIMv2, count_params
from aimv2train.model.posemb import resize_learned, sincos_2d

torch.set_num_threads(1)


@pytest.mark.parametrize("size", ["L", "H", "1B", "3B"])
def test_encoder_parameter_counts_match_table_1(size):
    with torch.device("meta"):
        enc = Encoder(ENCODER_PRESETS[size])
    n = count_params(enc)
    # Table 1 prints one decimal, truncated (H has 0.68B parameters and is listed as 0.6B)
    assert math.floor(n / 1e8) / 10 == PAPER_ENCODER_PARAMS_B[size], n


def test_released_widths():
    # transformers' Aimv2VisionConfig default (L) and ml-aim's aimv2_{base,huge,1B,3B} mlp_hidden_dim
    assert {k: swiglu_hidden(c.dim) for k, c in ENCODER_PRESETS.items() if k != "tiny"} == {
        "B": 2048, "L": 2816, "H": 4096, "1B": 5632, "3B": 8192}
    assert all(c.dim // c.heads == 128 for k, c in ENCODER_PRESETS.items() if k != "tiny")
    with torch.device("meta"):
        model = AIMv2(model_config("3B", vocab_size=32000))
    dec = model.decoder
    assert (dec.cfg.dim, dec.cfg.depth, dec.image_proj.in_features) == (1024, 12, 3072)
    assert model.pixel_head.bias is None and model.text_head.bias is None
    assert model.pixel_head.out_features == 14 * 14 * 3 and model.text_head.out_features == 32000


def test_sincos_layout_is_sin_x_cos_x_sin_y_cos_y_row_major():
    dim, h, w = 16, 2, 3
    pe = sincos_2d(h, w, dim)
    assert pe.shape == (h * w, dim)
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    for idx in range(h * w):
        y, x = divmod(idx, w)  # row-major tokens
        expected = torch.cat([(x * omega).sin(), (x * omega).cos(), (y * omega).sin(), (y * omega).cos()])
        torch.testing.assert_close(pe[idx], expected.float())


def test_learned_table_resamples_to_other_grids():
    pos = torch.randn(1, 16, 8)
    assert resize_learned(pos, (4, 4), (4, 4)) is pos
    out = resize_learned(pos, (4, 4), (3, 5))
    assert out.shape == (1, 15, 8)
    const = torch.ones(1, 16, 8)
    torch.testing.assert_close(resize_learned(const, (4, 4), (6, 2)), torch.ones(1, 12, 8))


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_training_step_on_a_different_grid_each_step(pos):
    torch.manual_seed(0)
    model = AIMv2(model_config("tiny", pos_embed=pos, img_size=56))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for h, w in [(4, 4), (2, 7), (6, 3)]:
        x = torch.randn(2, 3, h * 14, w * 14)
        loss, parts = model.training_loss(x, None, torch.randint(3, 512, (2, 77)), 0, generator=g)
        assert parts["prefix_len"].max() <= h * w - 1
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    a = AIMv2(model_config("tiny"))
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x, tok, pl = torch.randn(2, 3, 56, 56), torch.randint(3, 512, (2, 77)), torch.tensor([3, 9])
    la, _ = a.training_loss(x, None, tok, 0, prefix_len=pl)
    lb, _ = b.training_loss(x, None, tok, 0, prefix_len=pl)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


@pytest.mark.parametrize("grid,text_len", [((4, 5), 77), ((3, 3), 20), ((4, 4), 0)])
def test_flops_formula_matches_the_flop_counter(grid, text_len):
    torch.manual_seed(0)
    cfg = model_config("tiny")
    model = AIMv2(cfg)
    B = 2
    x = torch.randn(B, 3, grid[0] * 14, grid[1] * 14)
    tok = torch.randint(3, 512, (B, text_len)) if text_len else None
    expected = step_flops(cfg, grid, B, text_len)
    # the counter has no formula for the CPU SDPA kernel; the math backend exposes its matmuls
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(x, tok, torch.tensor([2, 5]))
        with FlopCounterMode(display=False) as step:
            loss, _ = model.training_loss(x, None, tok, 0, prefix_len=torch.tensor([2, 5]))
            loss.backward()
        model.zero_grad()
        with FlopCounterMode(display=False) as enc:
            model.encoder(x).sum().backward()
    assert fwd.get_total_flops() == pytest.approx(expected.forward, rel=0.02)
    assert step.get_total_flops() == pytest.approx(expected.train, rel=0.02)
    assert enc.get_total_flops() == pytest.approx(encoder_train_flops(cfg.encoder, grid, B), rel=0.02)


@pytest.mark.slow
def test_torch_compile_dynamic_shapes_one_graph_for_all_grids():
    """Compiled training forward matches eager on two grids without recompiling (1-2 minutes on 2 CPU
    cores with a cold inductor cache, nearly all of it C++ compilation)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = AIMv2(model_config("tiny", pos_embed="sincos"))
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=True)
    for h, w in [(3, 5), (4, 6)]:
        x, tok = torch.randn(2, 3, h * 14, w * 14), torch.randint(3, 512, (2, 77))
        pl = torch.tensor([2, 7])
        lc, _ = compiled.training_loss(x, None, tok, 0, prefix_len=pl)
        le, _ = eager.training_loss(x, None, tok, 0, prefix_len=pl)
        lc.backward()
        le.backward()
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.encoder.blocks[0].attn.qkv.weight.grad,
                                   eager.encoder.blocks[0].attn.qkv.weight.grad, rtol=1e-4, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def _timm_resample_abs_pos_embed():
    """timm's own function. `timm.layers` imports torchvision; where that is missing, the module that holds
    the function (timm/layers/pos_embed.py, torch only) is loaded from the installed timm by itself."""
    try:
        from timm.layers import resample_abs_pos_embed
        return resample_abs_pos_embed
    except ImportError:
        pass
    import importlib
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed")
    # a package over timm's own layers/ folder, without its __init__ (the torchvision imports): pos_embed and
    # the torch-only modules it imports (_fx, helpers) are timm's files, whatever the version
    shim = types.ModuleType("_timm_layers")
    shim.__path__ = [f"{spec.submodule_search_locations[0]}/layers"]
    sys.modules.setdefault("_timm_layers", shim)
    return importlib.import_module("_timm_layers.pos_embed").resample_abs_pos_embed


@pytest.mark.parametrize("old,new", [((16, 16), (8, 8)), ((16, 16), (24, 10)), ((7, 9), (5, 13)), ((4, 4), (2, 8))])
def test_resize_learned_is_timm_resample_abs_pos_embed(old, new):
    timm_resample = _timm_resample_abs_pos_embed()
    pos = torch.randn(1, old[0] * old[1], 32, generator=torch.Generator().manual_seed(0))
    ref = timm_resample(pos, list(new), list(old), num_prefix_tokens=0)
    torch.testing.assert_close(resize_learned(pos, old, new), ref, rtol=0, atol=0)
