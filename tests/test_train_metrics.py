"""metrics.jsonl bookkeeping across a resume, the MFU denominator, and `aimv2 plot`."""
import json

import pytest
import torch
from click.testing import CliRunner

from aimv2train.train.metrics import MetricsLog, matmul_peak, read_metrics, summarize
from aimv2train.train.plot import ema, plot_runs

torch.set_num_threads(1)


def rec(step, loss):
    return {"step": step, "loss": loss, "loss_img": loss / 2, "loss_text": loss / 3, "lr": 1e-3 / step,
            "grad_norm": 1.0 + step, "images_per_s": 10.0, "patches_per_s": 640.0, "mfu": 0.1, "step_time": 0.5}


def test_resume_drops_steps_after_the_checkpoint(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for s in range(1, 8):  # the run logged 7 steps, its last checkpoint was at 5, then it died
        log.write(rec(s, 10.0 - s))
    log.close()
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=5)
    log.write(rec(6, 99.0))
    log.close()
    steps = [r["step"] for r in read_metrics(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6] and read_metrics(tmp_path)[-1]["loss"] == 99.0
    MetricsLog(tmp_path / "metrics.jsonl").close()  # a fresh run starts an empty file
    assert read_metrics(tmp_path) == []


def test_a_run_logged_before_the_renames_reads_under_the_new_names(tmp_path):
    """Issue 23 point 4: metrics.jsonl's "epoch" (the batch's source epoch) is "source_epoch"; an older run's
    lines read under the new name, and resuming it rewrites its kept lines so that the file reads alike."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({**rec(s, 5.0), "epoch": s // 2}) + "\n" for s in (1, 2, 3)))
    assert [r["source_epoch"] for r in read_metrics(tmp_path)] == [0, 1, 1]
    assert not any("epoch" in r for r in read_metrics(tmp_path))
    log = MetricsLog(path, resume_step=2)
    log.write({**rec(3, 4.0), "source_epoch": 1})
    log.close()
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [sorted(k for k in r if "epoch" in k) for r in raw] == [["source_epoch"]] * 3


def test_summary_numbers():
    recs = [rec(s, float(s)) for s in range(1, 31)]
    # one slow step of 4.5 s at 1 image/s: 29 steps, 28 x 0.5 s + 4.5 s = 18.5 s, 28 x 5 + 4.5 images
    recs[10].update(step_time=4.5, images_per_s=1.0, mfu=0.0)
    s = summarize(recs, first=10)
    assert s["loss_start"] == pytest.approx(5.5) and s["loss_end"] == pytest.approx(25.5)
    assert s["steps_per_s"] == pytest.approx(29 / 18.5)
    assert s["images_per_s"] == pytest.approx((28 * 5 + 4.5) / 18.5)
    assert s["mfu"] == pytest.approx(0.1 * 14 / 18.5)
    # a short run: the start and end windows are its halves, not the same steps
    short = summarize(recs[:6], first=10)
    assert short["loss_start"] == pytest.approx(2.0) and short["loss_end"] == pytest.approx(5.0)


def test_matmul_peak_is_a_plausible_rate():
    peak = matmul_peak("cpu", torch.float32, n=256, min_time=0.05)
    assert 1e8 < peak < 1e13  # FLOP/s: a CPU core does between 0.1 GFLOP/s and 10 TFLOP/s


def test_ema_is_debiased():
    assert ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    assert ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])


def test_plot_writes_pngs(tmp_path):
    from cli.main import main

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(rec(s, 5.0 / s)) + "\n" for s in range(1, 40)))
    paths = plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "plots", smooth=0.5)
    assert sorted(p.name for p in paths) == ["grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "a")])
    assert r.exit_code == 0 and (tmp_path / "a" / "loss.png").is_file()
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "empty")])
    assert r.exit_code == 1 and "metrics.jsonl" in r.output
