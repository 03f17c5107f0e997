"""Checkpoints: atomic, pruned, readable by interop.load_encoder, and a save killed half way leaves the
previous checkpoint as the one to resume."""
import random

import numpy as np
import pytest
import torch

from aimv2train.train import checkpoint as ck
from aimv2train.model.config import model_config
from aimv2train.model.aimv2 import AIMv2
from aimv2train.train.optim import build_optimizer

torch.set_num_threads(1)


def make(seed=0):
    torch.manual_seed(seed)
    cfg = model_config("tiny", vocab_size=32, img_size=28)
    model = AIMv2(cfg)
    opt = build_optimizer(model, lr=1e-3, weight_decay=1e-4)
    return cfg, model, opt


def train_step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 28, 28, generator=g)
    tokens = torch.randint(1, 32, (2, 77), generator=g)
    loss, _ = model.training_loss(images, None, tokens, 0, generator=g)
    opt.zero_grad()
    loss.backward()
    opt.step()


def save(d, step, model, opt, cfg, keep=2, **kw):
    return ck.save_checkpoint(d, step, model, opt, model_config=cfg.to_dict(), train={"steps": 10},
                              rank_state={"loader": {"segment": 0, "offset": np.int64(step), "perm": np.arange(3)},
                                          "rng": ck.rng_state()}, tokenizer_bytes=b"tok", keep=keep, **kw)


def test_round_trip_and_interop(tmp_path):
    from aimv2train.eval.weights import load_weights

    cfg, model, opt = make()
    train_step(model, opt, 0)
    path = save(tmp_path / "checkpoints", 1, model, opt, cfg)
    assert path.name == "step_00000001.pt"
    ckpt = torch.load(path, weights_only=True)  # plain data only: numpy became tensors / ints
    assert ckpt["step"] == 1 and ckpt["ranks"][0]["loader"]["offset"] == 1
    assert bytes(ckpt["tokenizer"].numpy()) == b"tok"
    enc = load_weights(tmp_path)  # the run directory, as `aimv2 export` would be given it
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v)

    _, fresh, fresh_opt = make(seed=1)
    ck.load_training_state(path, ckpt, fresh, fresh_opt, sharded=False)
    train_step(model, opt, 1)
    train_step(fresh, fresh_opt, 1)  # same state + same batch -> same weights, bit for bit
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip():
    g = torch.Generator().manual_seed(3)
    state = ck.rng_state(g)
    first = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    ck.set_rng_state(state, g)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(first[0], again[0]) and first[1:3] == again[1:3] and torch.equal(first[3], again[3])


def test_keeps_the_newest(tmp_path):
    cfg, model, opt = make()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, opt, cfg, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    save(tmp_path, 5, model, opt, cfg, keep=0)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4, 5]


def test_kill_during_save_leaves_previous_loadable(tmp_path, monkeypatch):
    cfg, model, opt = make()
    save(tmp_path, 1, model, opt, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, opt, 0)

    real_save = torch.save

    def dying_save(obj, f, *a, **kw):  # half a file hits the disk, then the process "dies"
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2, model, opt, cfg)
    monkeypatch.undo()
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    path, ckpt = ck.latest_checkpoint(tmp_path)
    assert ckpt["step"] == 1
    assert all(torch.equal(ckpt["model"][k], v) for k, v in before.items())


def test_corrupt_newest_falls_back(tmp_path):
    cfg, model, opt = make()
    save(tmp_path, 1, model, opt, cfg)
    p2 = save(tmp_path, 2, model, opt, cfg)
    p2.write_bytes(p2.read_bytes()[:1000])  # e.g. a disk that filled up after the rename
    notices = []
    path, ckpt = ck.latest_checkpoint(tmp_path, notify=notices.append)  # a one-line notice, not a warning
    assert ckpt["step"] == 1 and len(notices) == 1
    assert "step_00000002.pt is damaged" in notices[0] and "resuming from step_00000001.pt" in notices[0]
    assert ck.latest_checkpoint(tmp_path / "none") is None
