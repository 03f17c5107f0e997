"""`aimv2 bench gpu --dry-run`: the prepared GPU check runs end to end on CPU (tiny sizes, the same code
path), every part ends ok or skipped-with-a-reason, and it degrades part by part: without polars,
webdataset and click (the GPU machine has none of them) only the trainer part is skipped."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aimv2train import gpucheck
from aimv2train.gpucheck import common, runner, steps
from aimv2train.gpucheck import trainer as trainer_part

ROOT = Path(__file__).resolve().parents[1]
ENV_NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def _check_parts(result: dict) -> dict:
    parts = result["parts"]
    assert list(parts) == list(gpucheck.PARTS)
    for name, rec in parts.items():
        assert rec["status"] in ("ok", "skipped"), (name, rec)
        if rec["status"] == "skipped":
            assert rec["reason"], name
    for row in parts["steps"]["rows"]:
        assert row["status"] in ("ok", "skipped") and (row["status"] == "ok" or row["reason"]), row
    return parts


def test_dry_run_end_to_end_through_the_cli(tmp_path):
    out = tmp_path / "dry.json"
    r = subprocess.run([sys.executable, "-m", "cli.main", "bench", "gpu", "--dry-run", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parts = _check_parts(json.loads(out.read_text()))
    assert all(parts[p]["status"] == "ok" for p in ("env", "peak", "steps", "parity", "decode", "trainer"))
    ok_rows = [row for row in parts["steps"]["rows"] if row["status"] == "ok"]
    assert {(row["resolution"], row["attention"]) for row in ok_rows} == {("fixed", "sdpa"), ("native", "sdpa")}
    assert all(row["images_per_s"] > 0 and 0 < row["mfu"] for row in ok_rows)
    # issue 21 point 7: MFU over the trainer's reference peak (train.metrics.reference_peak), named, with the
    # matmul part's measurement beside it rather than under it
    assert parts["steps"]["peak_source"].startswith("best cpu matmul ever measured on this machine")
    assert parts["steps"]["peak_tflops"] > 0 and "measured_peak_tflops" in parts["steps"]
    assert parts["parity"]["within_tolerance"] and set(parts["parity"]["cpu_vs_device"]) >= {"sdpa", "flex"}
    assert parts["decode"]["pil"]["fixed"]["images_per_s"] > 0 and parts["decode"]["pil"]["fixed"]["failed"] == 0
    assert parts["trainer"]["steps"] == common.DRY_SIZES.trainer_steps
    assert "aimv2 bench gpu (dry run" in r.stdout and "steps: ok" in r.stdout


def test_without_polars_webdataset_click_only_the_trainer_part_is_skipped(tmp_path):
    out = tmp_path / "dry.json"
    code = ("import sys\n"
            "for m in ('polars', 'webdataset', 'click', 'rich'): sys.modules[m] = None  # import now fails\n"
            "from aimv2train.gpucheck.runner import main\n"
            f"sys.exit(main(['--dry-run', '--out', {str(out)!r}, '--parts', 'env,steps,parity,decode,trainer']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parts = _check_parts(json.loads(out.read_text()))
    assert parts["trainer"]["status"] == "skipped" and "polars" in parts["trainer"]["reason"]
    assert parts["peak"]["status"] == "skipped"  # not asked for
    assert all(parts[p]["status"] == "ok" for p in ("env", "steps", "parity", "decode"))
    assert set(parts["env"]["missing"]) >= {"polars", "webdataset", "click"}


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def broken(**_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(runner.PART_FUNCS, "parity", broken)
    result = runner.run(tmp_path / "r.json", dry_run=True, parts=("env", "parity", "decode"))
    parts = json.loads((tmp_path / "r.json").read_text())["parts"]
    assert {k: v["status"] for k, v in parts.items()} == {k: v["status"] for k, v in result["parts"].items()}
    assert parts["parity"]["status"] == "error" and "illegal memory access" in parts["parity"]["reason"]
    assert parts["env"]["status"] == "ok" and parts["decode"]["status"] == "ok"
    assert parts["steps"] == {"status": "skipped", "reason": "not asked for (--parts)"}


def test_unknown_part_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--dry-run", "--parts", "steps,gpu_magic"])
    assert "unknown ['gpu_magic']" in capsys.readouterr().err


def test_out_of_memory_halves_the_batch_and_says_so(monkeypatch):
    real, calls = steps.time_steps, []

    def oom_once(run, batches, *args):
        calls.append(batches[0].images.shape[0])
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(run, batches, *args)

    monkeypatch.setattr(steps, "time_steps", oom_once)
    row = steps._step_config(common.DRY_SIZES, torch.device("cpu"), "fixed", "sdpa", False, peak=1e12)
    assert calls == [4, 2] and row["oom_at_batch"] == [4] and row["batch"] == 2 and row["images_per_s"] > 0


def test_the_steps_part_times_the_trainers_train_step_on_loader_batches(tmp_path, monkeypatch):
    """Issue 22 point 6: one step function. Every timed step of the steps part is train.trainer.train_step
    itself (warm-up included), and the fixed-resolution rows step on the real loader's batches."""
    from aimv2train.train import trainer

    real, seen = trainer.train_step, []

    def counting(run, batch, stop):
        seen.append((type(run).__name__, type(batch).__name__, batch.images.dtype))
        return real(run, batch, stop)

    monkeypatch.setattr(trainer, "train_step", counting)
    monkeypatch.setitem(runner.PART_FUNCS, "trainer", trainer_part.part_trainer)
    result = runner.run(tmp_path / "r.json", dry_run=True, parts=("trainer", "steps"), rows=("fixed-sdpa-eager",))
    rows = result["parts"]["steps"]["rows"]
    assert [r["status"] for r in rows] == ["ok"], rows
    sizes = common.DRY_SIZES
    row = rows[0]
    assert row["step_function"] == "train.trainer.train_step" and row["batches"] == "loader"
    assert seen.count(("Run", "Batch", torch.uint8)) >= sizes.warmup + sizes.steps
