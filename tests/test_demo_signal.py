"""SIGTERM stops `aimv2 demo` (issue 20 point 13): exit 143, the interrupted step is not done and no later
step runs, so a rerun resumes it and the next stage starts from its final weights."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from aimv2train import demo_pipeline  # noqa: E402
from cli.main import main  # noqa: E402

torch.set_num_threads(1)


def test_sigterm_in_a_training_step_stops_the_demo_with_143(tmp_path, monkeypatch):
    _train_fixtures.build(tmp_path)   # tmp_path/manifest and tok.model, where the demo's train steps read them
    steps = [demo_pipeline._train_step("train_fixed", steps=4, resolution=56, batch_size=8, save_every=0),
             demo_pipeline._train_step("train_native", steps=2, native_res=True, batch_patches=4096,
                                       init_run="train_fixed")]
    monkeypatch.setattr(demo_pipeline, "STEPS", steps)
    with monkeypatch.context() as m:
        _train_fixtures.signal_on_forward(m, 2, signal.SIGTERM)
        res = CliRunner().invoke(main, ["demo", "-o", str(tmp_path)])
    assert res.exit_code == 143, res.output
    assert "interrupted (SIGTERM)" in res.output and "rerun the same command" in res.output
    fixed = json.loads((tmp_path / "train_fixed" / "summary.json").read_text())
    assert fixed["status"] == "interrupted" and fixed["step"] == 2
    assert not (tmp_path / "train_native").exists()        # never initialised from the step-2 checkpoint
    res = CliRunner().invoke(main, ["demo", "-o", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "train_fixed" / "summary.json").read_text())["status"] == "done"
    native = json.loads((tmp_path / "train_native" / "summary.json").read_text())
    assert native["status"] == "done" and "step_00000004.pt" in native["init"]
