"""`--report-to tensorboard,wandb` and `--val-manifest`: the trackers hold what metrics.jsonl holds, and
held-out losses are logged next to the training losses, deterministically."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402
from _train_fixtures import metrics  # noqa: E402

from aimv2data.manifest.split import split_manifest  # noqa: E402
from aimv2train.train import tracking  # noqa: E402
from aimv2train.train.trainer import TrainError, train  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("track_data")
    manifest, tok = _train_fixtures.build(root, tars=2)  # two parts: two ranks each get a share (loader.py)
    split_manifest(manifest, root / "split", 0.15)
    return root / "split/train", root / "split/val", tok


def cfg(data, out, **kw):
    train_m, _, tok = data
    return _train_fixtures.tiny_config(train_m, tok, out, **{"steps": 4, "seed": 1, **kw})


@pytest.fixture(scope="module")
def tracked_run(data, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("WANDB_MODE", "offline")  # Makefile / conftest disable wandb; offline writes files
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    out = tmp_path_factory.mktemp("tracked")
    train(cfg(data, out, report_to="tensorboard,wandb", val_manifest=str(data[1]), val_every=2))
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tensorboard_events_hold_the_metrics_jsonl_values(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    recs = metrics(tracked_run)
    for key in ("loss", "loss_img", "loss_text", "lr", "grad_norm", "images_per_s", "mfu", "data_time"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in recs]
        assert [e.value for e in events] == pytest.approx([r[key] for r in recs], rel=1e-6)  # float32 events
    assert {"train/grid_0", "train/grid_1"} <= tags
    val = acc.Scalars("val/loss_img")
    assert [e.step for e in val] == [2, 4]
    assert [e.value for e in val] == pytest.approx([r["val_loss_img"] for r in recs if "val_loss_img" in r],
                                                   rel=1e-6)


def test_wandb_offline_run_directory_is_written(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert (tracked_run / "wandb_id").read_text().strip() in runs[0].name


def test_validation_losses_logged_deterministic_and_not_training(tracked_run, data, tmp_path):
    recs = metrics(tracked_run)
    with_val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in with_val] == [2, 4]  # every 2 steps, and at the end
    n_val = len(__import__("polars").read_parquet(data[1] / "samples/*.parquet"))
    for r in with_val:
        assert all(math.isfinite(r[k]) for k in ("val_loss", "val_loss_img", "val_loss_text"))
        assert r["val_loss"] == pytest.approx(r["val_loss_text"] + 0.4 * r["val_loss_img"], rel=1e-5)
        assert r["val_images"] == min(8, n_val)  # one batch of the held-out set
    # the same weights give the same validation losses; the training losses are untouched by it
    out = tmp_path / "again"
    train(cfg(data, out, val_manifest=str(data[1]), val_every=2))
    again = metrics(out)
    keys = ("loss", "loss_img", "loss_text", "val_loss_img", "val_loss_text")
    assert [[r.get(k) for k in keys] for r in again] == [[r.get(k) for k in keys] for r in recs]
    plain = tmp_path / "plain"
    train(cfg(data, plain))
    assert [r["loss"] for r in metrics(plain)] == [r["loss"] for r in recs]


def test_resumed_run_continues_its_tensorboard_curves(data, tmp_path, monkeypatch):
    """A crash after logging steps 3-4 but before their checkpoint: the resume redoes them from step 2,
    and TensorBoard shows each step once (purge_step), as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aimv2train.train import checkpoint as ck

    real = ck.save_checkpoint

    def crash_at_4(ckpt_dir, step, *a, **kw):
        if step == 4:
            raise RuntimeError("killed")
        return real(ckpt_dir, step, *a, **kw)

    monkeypatch.setattr(ck, "save_checkpoint", crash_at_4)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg(data, tmp_path, report_to="tensorboard", save_every=2))
    monkeypatch.setattr(ck, "save_checkpoint", real)
    train(cfg(data, tmp_path, report_to="tensorboard", save_every=2, resume=True))
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4]  # each step once, across the two processes' files
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in metrics(tmp_path)], rel=1e-6)


def test_report_to_errors_are_one_line_and_name_the_package(data, tmp_path, monkeypatch):
    with pytest.raises(TrainError, match="'tensorbord' is not a tracker: choose from tensorboard, wandb"):
        train(cfg(data, tmp_path, report_to="tensorbord"))
    real = __import__("importlib").import_module

    def no_tensorboard(name, *a, **kw):
        if name == "tensorboard":
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr("importlib.import_module", no_tensorboard)
    with pytest.raises(tracking.TrackingError, match="needs the `tensorboard` package: pip install tensorboard"):
        tracking.open_sinks("tensorboard", tmp_path)
    assert tracking.open_sinks("tensorboard", tmp_path, enabled=False) == []  # ranks > 0: nothing opened


def test_plot_draws_validation_losses(tracked_run, tmp_path):
    from aimv2train.train.plot import make_figures, plot_runs

    fig = make_figures([tracked_run])["loss"]
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    assert list(lines["val image"].get_xdata()) == [2, 4] and len(lines["image (MSE)"].get_xdata()) == 4
    assert (tmp_path / "loss.png") in plot_runs([tracked_run], tmp_path)


@pytest.mark.slow
def test_two_ranks_validate_together_and_only_rank0_reports(data, tmp_path):
    """torchrun, 2 gloo ranks: each rank evaluates its slice, the losses are reduced over both; only rank 0
    writes TensorBoard events; DDP and FSDP2 give the same validation losses."""
    import os
    import subprocess

    train_m, val_m, tok = data
    root = Path(__file__).resolve().parents[1]
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "cli.main", "train", "-m", str(train_m), "-t", str(tok), "-o", str(out), "--steps", "4",
               "--resolution", "56", "--batch-size", "4", "--workers", "0", "--seed", "1", "--no-progress",
               "--save-every", "0", "--peak-flops", "1e11", "--val-manifest", str(val_m), "--val-every", "2",
               "--report-to", "tensorboard", "--parallel", mode]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 only
        assert r.stdout.count("val loss") == 1 and "throughput" in r.stdout  # rank 0's summary
        runs[mode] = [m for m in metrics(out) if "val_loss" in m]
    n_val = len(__import__("polars").read_parquet(val_m / "samples/*.parquet"))
    for recs in runs.values():
        assert [m["step"] for m in recs] == [2, 4]
        assert all(m["val_images"] == 2 * min(4, n_val // 2) for m in recs)  # both ranks' slices
    for a, b in zip(runs["ddp"], runs["fsdp"]):
        for k in ("val_loss_img", "val_loss_text"):
            assert b[k] == pytest.approx(a[k], rel=1e-4)
