"""Two processes under torchrun with the gloo backend on CPU: DDP and FSDP2 train on the real loader
(each rank its own slice), agree with each other, and an FSDP2 run stopped and resumed from its DCP
checkpoint continues exactly."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("dist_data"), tars=2)


def torchrun(data, out, *extra):
    manifest, tok = data
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cli.main", "train", "-m", str(manifest), "-t", str(tok), "-o", str(out), "--model", "tiny",
           "--steps", "8", "--resolution", "56", "--batch-size", "4", "--workers", "0", "--seed", "1",
           "--no-progress", "--save-every", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # a hung rendezvous must not leave orphaned ranks behind after the timeout
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun forwards SIGTERM to its workers (they run in sessions of their own)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after 300 s\n{out[-3000:]}{err[-3000:]}")
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_ddp_and_fsdp_on_gloo(data, tmp_path):
    r = torchrun(data, tmp_path / "ddp", "--parallel", "ddp")
    assert r.stdout.count("aimv2 train: done") == 1  # one summary, from rank 0
    ddp = metrics(tmp_path / "ddp")
    assert [m["step"] for m in ddp] == list(range(1, 9))
    assert all(m["batch"] == 8 for m in ddp)  # 2 ranks x 4 images: the global batch
    ck = torch.load(tmp_path / "ddp/checkpoints/step_00000008.pt", weights_only=True)
    assert ck["train"]["world_size"] == 2 and len(ck["ranks"]) == 2
    assert [s["loader"]["rank"] for s in ck["ranks"]] == [0, 1]

    torchrun(data, tmp_path / "fsdp", "--parallel", "fsdp", "--stop-at", "4")
    assert (tmp_path / "fsdp/checkpoints/step_00000004.dcp").is_dir()
    torchrun(data, tmp_path / "fsdp", "--parallel", "fsdp", "--resume")
    fsdp = metrics(tmp_path / "fsdp")
    assert [m["step"] for m in fsdp] == list(range(1, 9))
    # same data, same initial weights, same maths: DDP and (resumed) FSDP2 agree to float rounding
    for a, b in zip(ddp, fsdp):
        for k in ("loss", "loss_img", "loss_text", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), (a["step"], k)
    # the consolidated weights FSDP2 writes next to its shards equal DDP's to the same tolerance
    wf = torch.load(tmp_path / "fsdp/checkpoints/step_00000008.pt", weights_only=True)["model"]
    for k, v in ck["model"].items():
        torch.testing.assert_close(wf[k], v, rtol=1e-3, atol=1e-5)


def test_grad_accum_under_ddp_and_fsdp_gives_the_same_run(data, tmp_path):
    """--grad-accum across 2 ranks (DDP: all-reduce on the last micro-batch only; FSDP2: reduce-scatter each):
    the same losses and gradient norms step after step as the whole batch at once."""
    torchrun(data, tmp_path / "one", "--parallel", "ddp", "--steps", "4")
    torchrun(data, tmp_path / "ddp3", "--parallel", "ddp", "--steps", "4", "--grad-accum", "3")
    torchrun(data, tmp_path / "fsdp2", "--parallel", "fsdp", "--steps", "4", "--grad-accum", "2")
    one = metrics(tmp_path / "one")
    for run in ("ddp3", "fsdp2"):
        other = metrics(tmp_path / run)
        assert [m["step"] for m in other] == [1, 2, 3, 4]
        for a, b in zip(one, other):
            for k in ("loss", "loss_img", "loss_text", "grad_norm"):
                assert b[k] == pytest.approx(a[k], rel=1e-4), (run, a["step"], k)
