"""Fully decoupled AdamW, its parameter groups, the warmup-cosine schedule and the Table A1 presets."""
import math

import pytest
import torch

from aimv2train.model.config import model_config
from aimv2train.model.aimv2 import AIMv2
from aimv2train.train.optim import DecoupledAdamW, build_optimizer, param_groups
from aimv2train.train.presets import PAPER, STAGES, resolve, scaled_warmup
from aimv2train.train.schedule import WarmupCosine

torch.set_num_threads(1)


def test_one_step_is_the_documented_update():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, 3, generator=g, dtype=torch.float64)
    grad = torch.randn(5, 3, generator=g, dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    opt = DecoupledAdamW([p], lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt.param_groups[0]["lr"] = 5e-4  # a quarter of the peak: decay is a quarter of wd
    p.grad = grad.clone()
    opt.step()
    m = 0.1 * grad / (1 - 0.9)
    v = 0.05 * grad ** 2 / (1 - 0.95)
    want = p0 * (1 - 0.25 * 0.1) - 5e-4 * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-15)


def test_without_decay_it_is_adam():
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    ours = DecoupledAdamW(a.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    ref = torch.optim.Adam(b.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    x = torch.randn(16, 4)
    for step in range(6):
        for opt in (ours, ref):
            opt.param_groups[0]["lr"] = 1e-2 * (step + 1) / 6
        for model, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("peak", [1e-4, 1e-3, 1e-1])
def test_decay_does_not_scale_with_the_peak_lr(peak):
    """Zero gradient: the Adam step is 0 and only the decay acts; it depends on lr_t / peak, not on peak
    (torch's AdamW would shrink by lr_t * wd, 1000x more at 1e-1 than at 1e-4)."""
    p = torch.nn.Parameter(torch.ones(10))
    opt = DecoupledAdamW([p], lr=peak, weight_decay=1e-2)
    opt.param_groups[0]["lr"] = peak / 2
    p.grad = torch.zeros(10)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((10,), 1 - 0.5 * 1e-2), rtol=0, atol=1e-7)


def test_foreach_and_loop_agree():
    torch.manual_seed(1)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [DecoupledAdamW(param_groups(m, 0.05), lr=3e-3, foreach=f) for m, f in zip(models, (True, False))]
    x = torch.randn(4, 8)
    for _ in range(4):
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x).sin().sum().backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_no_decay_on_norms_biases_and_position_tables():
    model = AIMv2(model_config("tiny", vocab_size=64, img_size=56))
    groups = {g["group"]: g for g in param_groups(model, 1e-4)}
    no_decay = set(groups["no_decay"]["names"])
    assert {"encoder.pos_embed", "decoder.text_pos", "encoder.patch_embed.proj.bias",
            "decoder.image_proj.bias", "encoder.norm.weight", "encoder.blocks.0.norm1.weight"} <= no_decay
    assert all(n.endswith(("bias", "norm.weight", "norm1.weight", "norm2.weight", "pos_embed", "text_pos"))
               for n in no_decay)
    decay = groups["decay"]["names"]
    assert {"decoder.token_embed.weight", "encoder.blocks.0.attn.qkv.weight", "text_head.weight",
            "encoder.patch_embed.proj.weight"} <= set(decay)
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 1e-4
    assert len(no_decay) + len(decay) == len(list(model.parameters()))
    opt = build_optimizer(model, lr=1e-3, weight_decay=1e-4)
    assert [g["peak_lr"] for g in opt.param_groups] == [1e-3, 1e-3]


def test_schedule_warmup_then_cosine_to_min():
    s = WarmupCosine(peak_lr=1e-3, min_lr=1e-5, warmup=10, total=110)
    assert s.lr(0) == pytest.approx(1e-4) and s.lr(9) == pytest.approx(1e-3)
    assert s.lr(10) == pytest.approx(1e-3)
    assert s.lr(60) == pytest.approx((1e-3 + 1e-5) / 2)  # half way through the decay
    assert s.lr(110) == s.lr(10_000) == 1e-5
    lrs = [s.lr(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.lr(109) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    opt = DecoupledAdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    assert s.apply(opt, 60) == opt.param_groups[0]["lr"] == pytest.approx(5.05e-4)
    with pytest.raises(ValueError, match="warmup"):
        WarmupCosine(1e-3, 1e-5, 20, 10)


def test_table_b1_presets_and_small_run_rule():
    paper = {k: PAPER[k].peak_lr for k in ("L", "H", "1B", "3B")}
    assert paper == {"L": 1e-3, "H": 8e-4, "1B": 8e-4, "3B": 4e-4}
    full = resolve("L", "pretrain", 1_500_000)
    assert (full.warmup, full.min_lr, full.weight_decay, full.betas, full.clip) == (12_500, 1e-5, 1e-4, (0.9, 0.95), 1.0)
    assert PAPER["L"].batch_size == 8192 and PAPER["L"].total_steps == 1_500_000
    assert scaled_warmup(300) == 15 and scaled_warmup(10) == 1 and scaled_warmup(10**7) == 12_500
    short = resolve("3B", "pretrain", 300)
    assert (short.peak_lr, short.warmup, short.steps) == (4e-4, 15, 300)
    assert resolve("huge", "highres", 100).weight_decay == 0.0  # high-res adaptation: wd 0
    assert resolve("L", "highres", 100, weight_decay=1e-3).weight_decay == 1e-3  # explicit flag wins
    assert resolve("base", "native", 100, lr=3e-3, warmup=7).peak_lr == 3e-3
    assert STAGES["native"].pos_embed == "sincos" and STAGES["highres"].resolution == 336
    with pytest.raises(ValueError, match="longer than the run"):
        resolve("tiny", "pretrain", 10, warmup=20)
    with pytest.raises(ValueError, match="unknown stage"):
        resolve("tiny", "finetune", 10)


def test_the_model_answers_its_policy_questions():
    """The optimiser, FSDP and --init ask the model (no key-name matching outside it): which parameters
    are not decayed, which blocks are sharding units, how an earlier stage's weights are adapted."""
    model = AIMv2(model_config("tiny", vocab_size=64, img_size=56))
    skip = model.no_weight_decay()
    assert {"encoder.pos_embed", "decoder.text_pos", "encoder.norm.weight"} <= skip
    assert "encoder.blocks.0.attn.qkv.weight" not in skip
    units = model.fsdp_units()
    assert units == [*model.encoder.blocks, *model.decoder.blocks] and len(units) == (
        model.cfg.encoder.depth + model.cfg.decoder.depth)
    # a 224 px model's learned table (16 x 16) resampled to this 56 px model's 4 x 4 grid
    big = AIMv2(model_config("tiny", vocab_size=64, img_size=224)).state_dict()
    sd, notes = model.adapt_state_dict(big)
    assert sd["encoder.pos_embed"].shape == model.state_dict()["encoder.pos_embed"].shape
    assert notes == ["position table resampled 16x16 -> 4x4 (bicubic)"]
    native = AIMv2(model_config("tiny", vocab_size=64, pos_embed="sincos"))
    sd, notes = native.adapt_state_dict(big)
    assert "encoder.pos_embed" not in sd and "dropped" in notes[0]
    with pytest.raises(ValueError, match="text vocabulary has 32 ids"):
        model.adapt_state_dict(AIMv2(model_config("tiny", vocab_size=32, img_size=56)).state_dict())
