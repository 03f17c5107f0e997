"""Issue 21 points 1, 7, 8 on CPU: which device each rank's model and DALI decoder get (the decision logic;
no GPU here), MFU as one definition over all ranks' batches, and resuming at another world size."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from aimv2data.batch import REPLACED_KINDS  # noqa: E402
from aimv2train.train import trainer  # noqa: E402
from aimv2train.train.distributed import DistInfo, decoder_device, pick_device  # noqa: E402
from aimv2train.train.metrics import mfu  # noqa: E402
from aimv2train.train.preempt import StopRequest  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("ranks_data"))


class _FakeLoader:
    """Records what the trainer / validator hand the loader (a DALI decoder would open on `dali_device`)."""
    seen: list = []

    def __init__(self, manifest, **kw):
        _FakeLoader.seen.append(kw)
        self.patch_size = 14

    def state_dict(self):
        return {}

    def __len__(self):
        return 1


@pytest.mark.parametrize("local", [0, 3, 7])
def test_each_rank_decodes_on_its_own_gpu(monkeypatch, local):
    """Eight ranks each open their DALI pipelines (train and val) on their own LOCAL_RANK's GPU, not all on GPU 0."""
    import aimv2data.loader

    from aimv2train.train.validate import Validator

    monkeypatch.setattr(aimv2data.loader, "Loader", _FakeLoader)
    _FakeLoader.seen.clear()
    info, device = DistInfo(local, 8, local), torch.device("cuda", local)
    cfg = trainer.TrainConfig(manifest="m", tokenizer="t", out="o", image_decoder="dali", native_res=True,
                              batch_patches=4096)
    tok = type("Tok", (), {"pad_id": 0})()
    trainer.make_loader(cfg, tok, info, None, 14, device)
    monkeypatch.setattr("aimv2train.train.validate.min_over_ranks", lambda n, info, device: n)
    Validator("v", tok, info, device, native_res=True, resolution=None, batch_size=8, batch_patches=4096,
              decoder="dali")
    assert [kw["dali_device"] for kw in _FakeLoader.seen] == [local, local]
    assert decoder_device(torch.device("cpu")) is None  # a CPU model: DALI on the CPU


def test_dali_auto_device_is_the_local_rank(monkeypatch):
    """A Loader built outside the trainer ("auto") under torchrun takes LOCAL_RANK's GPU, not GPU 0."""
    from aimv2data.loader import decode_dali

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert decode_dali.cuda_device() == 5


def test_an_explicit_gpu_under_torchrun_is_refused():
    """--device cuda:1 under torchrun would put every rank on GPU 1: refused in one line, naming the fix."""
    with pytest.raises(ValueError, match=r"puts all 8 ranks on GPU 1: pass --device cuda"):
        pick_device("cuda:1", DistInfo(3, 8, 3))


def test_run_json_and_summary_record_each_ranks_devices(data, tmp_path):
    cfg = _train_fixtures.tiny_config(*data, tmp_path / "run", steps=1)
    s = trainer.train(cfg)
    devices = json.loads((tmp_path / "run" / "run.json").read_text())["devices"]
    assert devices == [{"rank": 0, "model": "cpu", "decoder": "pil on cpu"}]
    assert s["devices"] == "rank 0: model cpu, decoder pil on cpu"


def test_mfu_counts_every_ranks_batch(data, tmp_path, monkeypatch):
    """At native resolution ranks draw different grids: throughput and MFU sum all ranks' images and FLOPs
    (here a second rank with 3x this rank's work, through the step's one all-reduce) over ranks x one peak."""
    from aimv2train.model.flops import step_flops

    cfg = _train_fixtures.tiny_config(*data, tmp_path / "run", steps=4)
    run = trainer.build_run(cfg, DistInfo(), torch.device("cpu"))
    run.info = DistInfo(0, 2, 0)

    def two_ranks(t, info):
        other = t.clone()
        tail = len(REPLACED_KINDS) + 1  # after images, patches and FLOPs: the replaced counts by kind, stop
        other[-3 - tail:-tail] *= 3     # the other rank's images, patches and FLOPs
        return (t + other) / 2

    monkeypatch.setattr(trainer, "all_reduce_mean", two_ranks)
    batch = next(iter(run.loader))
    stop = StopRequest()
    try:
        result = trainer.train_step(run, batch, stop)
    finally:
        stop.restore()
    rec = trainer._record(run, batch, result, dt=2.0, t_data=0.0)
    B, (h, w) = batch.images.shape[0], batch.grid
    flops = step_flops(run.mcfg, (h, w), B, batch.tokens.shape[1]).train
    assert rec["batch"] == 4 * B and rec["patches"] == 4 * B * h * w and rec["images_per_s"] == 2 * B
    assert rec["mfu"] == pytest.approx(4 * flops / 2.0 / (2 * run.peak))
    assert mfu(4 * flops, 2.0, run.peak, 2) == pytest.approx(rec["mfu"])
