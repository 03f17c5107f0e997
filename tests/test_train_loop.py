"""The trainer end to end on a real manifest (demo corpus -> webdataset tar -> build_manifest) with the real
loader and the real AIMv2 model: resume equality, a save killed mid-write, divergence, stages."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402
from _train_fixtures import metrics  # noqa: E402

from aimv2train.train import checkpoint as ck  # noqa: E402
from aimv2train.train.trainer import NonFiniteLoss, TrainError, train  # noqa: E402

torch.set_num_threads(1)
KEYS = ("loss", "loss_img", "loss_text", "grad_norm", "lr")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("train_data"))


def cfg(data, out, **kw):
    return _train_fixtures.tiny_config(*data, out, **{"steps": 14, "seed": 3, **kw})


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted reference run: 14 steps, 80 images / 8 per step = 10 steps per epoch."""
    out = tmp_path_factory.mktemp("straight")
    s = train(cfg(data, out))
    return out, s


def test_run_writes_metrics_checkpoint_and_summary(straight):
    out, s = straight
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, 15))
    assert all(math.isfinite(r[k]) for r in recs for k in KEYS)
    assert {r["source_epoch"] for r in recs} == {0, 1} and recs[0]["batch"] == 8 and recs[0]["grid"] == [4, 4]
    assert recs[0]["lr"] == pytest.approx(1e-3 / 1)  # warmup = round(5% of 14) = 1 step, then cosine
    assert recs[-1]["lr"] < recs[5]["lr"] < recs[1]["lr"]
    assert all(0 < r["mfu"] < 1 and r["images_per_s"] > 0 for r in recs)
    assert s["status"] == "done" and s["checkpoint"].endswith("step_00000014.pt")
    assert json.loads((out / "summary.json").read_text())["status"] == "done"
    assert (s["peak_flops"], s["peak_source"]) == (1e11, "--peak-flops")   # which peak MFU is over (cfg sets it)
    assert [st for st, _ in ck.list_checkpoints(out / "checkpoints")] == [14]


def test_stop_resume_reproduces_losses_exactly(data, straight, tmp_path):
    """Stop at step 10 (the epoch boundary), resume to 14: the same numbers, bit for bit."""
    s = train(cfg(data, tmp_path, stop_at=10))
    assert s["status"] == "stopped" and s["step"] == 10
    s = train(cfg(data, tmp_path, resume=True))
    assert s["status"] == "done" and s["resumed_from"] == 10
    a, b = metrics(straight[0]), metrics(tmp_path)
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [[r[k] for k in KEYS] for r in a] == [[r[k] for k in KEYS] for r in b]
    wa = torch.load(straight[0] / "checkpoints/step_00000014.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "checkpoints/step_00000014.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_killed_save_then_resume_matches(data, straight, tmp_path, monkeypatch):
    """Checkpoints every 4 steps; the save at step 8 dies half written. The run resumes from step 4,
    redoes 5..8 (metrics.jsonl is cut back to 4) and ends exactly where the uninterrupted run did."""
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **kw):
        calls.append(obj["step"])
        real_save(obj, f, *a, **kw)
        if obj["step"] == 8:
            with open(f, "r+b") as fh:
                fh.truncate(100)
            raise KeyboardInterrupt("killed during the save of step 8")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(data, tmp_path, save_every=4))
    monkeypatch.undo()
    assert calls == [4, 8]
    assert [st for st, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [4]
    assert len(metrics(tmp_path)) == 8  # steps 5..8 were logged before the save died
    s = train(cfg(data, tmp_path, save_every=4, resume=True))
    assert s["resumed_from"] == 4
    a, b = metrics(straight[0]), metrics(tmp_path)
    assert [[r[k] for k in KEYS] for r in a] == [[r[k] for k in KEYS] for r in b]


def test_non_finite_loss_stops_and_keeps_last_good(data, tmp_path, monkeypatch):
    """A NaN injected into the loss of step 6 (a hook on the loss module): the run stops before applying
    it, saves nothing over the last good checkpoint (step 4) and says where that is."""
    from aimv2train.train import trainer

    real_forward, calls = trainer.LossModule.forward, []

    def poisoned(self, *args):
        terms = real_forward(self, *args)  # {"loss": total, "loss_img": ..., "loss_text": ...}
        calls.append(1)
        return {**terms, "loss": terms["loss"] * float("nan")} if len(calls) == 6 else terms

    monkeypatch.setattr(trainer.LossModule, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"step 6: the loss is not finite.*step_00000004\.pt \(step 4\)"):
        train(cfg(data, tmp_path, save_every=2))
    assert [st for st, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "non_finite" and summary["last_good_step"] == 4 and summary["step"] == 5
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]  # no NaN line
    calls.clear()
    r = CliRunner().invoke(__import__("cli.main", fromlist=["main"]).main, [
        "train", "-m", str(data[0]), "-t", str(data[1]), "--output", str(tmp_path / "cli"), "--resolution", "56",
        "--batch-size", "8", "--workers", "0", "--steps", "14", "--no-progress", "--save-every", "5"])
    assert r.exit_code == 3 and "step_00000005.pt" in r.output and "lower --lr" in r.output


def test_bad_starts_are_refused(data, straight, tmp_path):
    with pytest.raises(TrainError, match="already holds a run"):
        train(cfg(data, straight[0]))
    with pytest.raises(TrainError, match="batch_size was 8"):
        train(cfg(data, straight[0], resume=True, batch_size=4, steps=20))
    with pytest.raises(TrainError, match="needs? --init|pass --init"):
        train(cfg(data, tmp_path, stage="highres"))
    with pytest.raises(TrainError, match="--native-res"):
        train(cfg(data, tmp_path, stage="native"))
    s = train(cfg(data, tmp_path, resume=True, steps=2))  # --resume with nothing to resume starts fresh
    assert s["status"] == "done" and s["resumed_from"] is None


def test_highres_stage_resamples_the_position_table(data, straight, tmp_path):
    from aimv2train.model.posemb import resize_learned

    s = train(cfg(data, tmp_path, stage="highres", resolution=84, init=str(straight[0]), steps=2, lr=1e-12))
    assert "resampled 4x4 -> 6x6" in s["init"] and s["weight_decay"] == 0.0
    old = torch.load(straight[0] / "checkpoints/step_00000014.pt", weights_only=True)["model"]["encoder.pos_embed"]
    new = torch.load(tmp_path / "checkpoints/step_00000002.pt", weights_only=True)["model"]["encoder.pos_embed"]
    # lr 1e-12 and wd 0: the table is (to 1e-9) the bicubic resample of the 224-px run's
    torch.testing.assert_close(new, resize_learned(old, (4, 4), (6, 6)), rtol=0, atol=1e-8)
    assert metrics(tmp_path)[0]["grid"] == [6, 6]


def test_native_stage_gives_finite_losses(data, straight, tmp_path):
    s = train(cfg(data, tmp_path, native_res=True, resolution=None, batch_patches=4096, init=str(straight[0]),
                  steps=3))
    assert s["stage"] == "native" and "position table dropped" in s["init"]
    recs = metrics(tmp_path)
    assert len(recs) == 3
    for r in recs:
        assert math.isfinite(r["loss_img"]) and math.isfinite(r["loss_text"]) and r["loss_text"] > 0
        h, w = r["grid"]
        assert 128 // 2 < h * w <= 4096 and r["batch"] * h * w <= 4096
    state = torch.load(tmp_path / "checkpoints/step_00000003.pt", weights_only=True)
    assert "encoder.pos_embed" not in state["model"] and state["config"]["encoder"]["pos_embed"] == "sincos"


def test_sigterm_checkpoints_and_resumes_exactly(data, straight, tmp_path, monkeypatch, capsys):
    """A preemption notice (SIGTERM) during step 5: the step completes, a checkpoint is written, the run
    ends "interrupted"; the same command with --resume finishes it with the uninterrupted run's numbers."""
    import signal

    _train_fixtures.signal_on_forward(monkeypatch, 5, signal.SIGTERM)
    s = train(cfg(data, tmp_path))
    monkeypatch.undo()
    assert "aimv2 train: SIGTERM: saving a checkpoint" in capsys.readouterr().err  # a message, not a warning
    assert s["status"] == "interrupted" and s["step"] == 5
    assert s["signal"] == "SIGTERM" and s["exit_code"] == 143
    assert [st for st, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back
    train(cfg(data, tmp_path, resume=True))
    a, b = metrics(straight[0]), metrics(tmp_path)
    assert [[r[k] for k in KEYS] for r in a] == [[r[k] for k in KEYS] for r in b]


def test_loss_falls_clearly(data, tmp_path):
    """The demo's promise at test scale: 80 captioned images, tiny model, 56 px, 80 steps on CPU."""
    s = train(cfg(data, tmp_path, steps=80))
    recs = metrics(tmp_path)
    first, last = recs[:10], recs[-10:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < 0.6 * mean(first, "loss")
    assert mean(last, "loss_text") < 0.6 * mean(first, "loss_text")
    assert mean(last, "loss_img") < mean(first, "loss_img")
    assert s["loss_end"] == pytest.approx(mean(last, "loss"))


def test_init_from_a_transformers_folder_loads_the_encoder(data, straight, tmp_path):
    """--init with imported weights (a transformers Aimv2VisionModel folder): the encoder is taken, the
    decoder and heads start fresh."""
    from aimv2train.eval.weights import load_weights
    from aimv2train.model.interop import save_hf

    enc = load_weights(straight[0])
    save_hf(enc, tmp_path / "hf")
    s = train(cfg(data, tmp_path / "run", init=str(tmp_path / "hf"), steps=1, lr=1e-12, weight_decay=0.0))
    assert "encoder only" in s["init"] and "decoder and heads" in s["init"]
    got = torch.load(tmp_path / "run/checkpoints/step_00000001.pt", weights_only=True)["model"]
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(got[f"encoder.{k}"], v, rtol=0, atol=1e-9)
