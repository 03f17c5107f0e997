"""Two processes under torchrun with the gloo backend on CPU: DDP and FSDP2 train on the real loader
(each rank its own slice), agree with each other, and an FSDP2 run stopped and resumed from its DCP
checkpoint continues exactly. A DDP run preempted as Slurm does it (SIGTERM to every process, torchrun's
forwarded copy, another mid-save) checkpoints, exits 143 on every rank and resumes exactly, rank 0 alone
verifying the checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402
from _timeouts import scaled

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
LOSSES = ("loss", "loss_img", "loss_text", "grad_norm")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("dist_data"), tars=2)


def launch(data, out, *extra, probe: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """torchrun with 2 ranks training the tiny model for 8 steps; with `probe`, each rank runs under
    tests/_rank_probe.py, which records its pid, exit code and checkpoint reads there."""
    manifest, tok = data
    entry = ["-m", "_rank_probe"] if probe else ["-m", "cli.main"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--shutdown-timeout", "120", *entry, "train", "-m", str(manifest), "-t", str(tok), "-o", str(out),
           "--model", "tiny", "--steps", "8", "--resolution", "56", "--batch-size", "4", "--workers", "0",
           "--seed", "1", "--no-progress", "--save-every", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env or {})}
    if probe:
        env["PROBE_DIR"] = str(probe)
    # its own session: a hung rendezvous must not leave orphaned ranks behind after the timeout
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=scaled(timeout))
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun forwards SIGTERM to its workers (they run in sessions of their own)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"torchrun timed out after {timeout} s\n{out[-3000:]}{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def torchrun(data, out, *extra, probe: Path | None = None):
    r = finish(launch(data, out, *extra, probe=probe))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def ddp(data, tmp_path_factory):
    """An uninterrupted 8-step DDP run: (its directory, torchrun's result)."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    return run, torchrun(data, run, "--parallel", "ddp")


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_ddp_and_fsdp_on_gloo(data, ddp, tmp_path):
    run, r = ddp
    assert r.stdout.count("aimv2 train: done") == 1  # one summary, from rank 0
    ddp = metrics(run)
    assert [m["step"] for m in ddp] == list(range(1, 9))
    assert all(m["batch"] == 8 for m in ddp)  # 2 ranks x 4 images: the global batch
    ck = torch.load(run / "checkpoints/step_00000008.pt", weights_only=True)
    assert ck["train"]["world_size"] == 2 and len(ck["ranks"]) == 2
    assert [s["loader"]["rank"] for s in ck["ranks"]] == [0, 1]

    torchrun(data, tmp_path / "fsdp", "--parallel", "fsdp", "--stop-at", "4")
    assert (tmp_path / "fsdp/checkpoints/step_00000004.dcp").is_dir()
    torchrun(data, tmp_path / "fsdp", "--parallel", "fsdp", "--resume")
    fsdp = metrics(tmp_path / "fsdp")
    assert [m["step"] for m in fsdp] == list(range(1, 9))
    # same data, same initial weights, same maths: DDP and (resumed) FSDP2 agree to float rounding
    for a, b in zip(ddp, fsdp):
        for k in LOSSES:
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


def _wait_for(what, cond, proc, timeout=240):
    deadline = time.time() + scaled(timeout)
    while not cond():
        if proc.poll() is not None or time.time() > deadline:
            r = finish(proc, timeout=60)
            pytest.fail(f"torchrun ended (rc {r.returncode}) or {timeout} s passed before {what}\n{r.stderr[-3000:]}")
        time.sleep(0.1)


def _sigterm_workers(probe: Path) -> None:
    for f in probe.glob("pid.*"):
        try:
            os.kill(int(f.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_preempted_ddp_run_checkpoints_exits_143_on_every_rank_and_resumes(data, ddp, tmp_path):
    """Slurm signals every process of the step (torchrun and each rank), torchrun forwards its own SIGTERM,
    and another (a second scancel) lands while rank 0 writes the checkpoint (slowed to 4 s): the repeats
    count as one, the checkpoint is written, both ranks exit 143; --resume, where rank 0 alone checks the
    CRCs and both map the file, ends with the uninterrupted run's losses."""
    run, probe = tmp_path / "run", tmp_path / "probe"
    probe.mkdir()
    proc = launch(data, run, "--parallel", "ddp", probe=probe, env={"PROBE_SLOW_SAVE": "4", "PROBE_SLOW_STEP": "1"})
    try:
        metrics_file = run / "metrics.jsonl"
        _wait_for("step 2", lambda: metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2
                  and len(list(probe.glob("pid.*"))) == 2, proc)
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun's agent, which forwards it to the ranks
        _sigterm_workers(probe)              # and each rank directly, as Slurm signals the whole step
        _wait_for("the checkpoint write", lambda: (probe / "saving.0").exists(), proc)
        _sigterm_workers(probe)              # a second scancel, mid-save
        r = finish(proc)
    finally:
        if proc.poll() is None:  # the test failed before torchrun ended: leave no rank behind
            for pid in [proc.pid] + [int(f.read_text()) for f in probe.glob("pid.*")]:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            proc.communicate()
    exits = {f.name: int(f.read_text()) for f in probe.glob("exit.*")}
    assert exits == {"exit.0": 143, "exit.1": 143}, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["exit_code"] == 143
    assert summary["save_time"] >= 4  # the slowed write, measured (docs/train.md sizes --signal by it)
    saved = summary["step"]
    assert 2 <= saved < 8 and (run / f"checkpoints/step_{saved:08d}.pt").is_file()

    resumed = tmp_path / "probe_resume"
    resumed.mkdir()
    torchrun(data, run, "--parallel", "ddp", "--resume", probe=resumed)
    logs = {rank: (resumed / f"log.{rank}").read_text().splitlines() for rank in (0, 1)}
    assert logs[0].count(f"crc step_{saved:08d}.pt") == 1 and not any(ln.startswith("crc") for ln in logs[1])
    loads = [ln for rank in (0, 1) for ln in logs[rank] if ln.startswith("load step_")]
    assert len(loads) == 2 and all(ln.endswith("mmap=True") for ln in loads)
    a, b = metrics(ddp[0]), metrics(run)
    assert [m["step"] for m in b] == list(range(1, 9))
    assert [[m[k] for k in LOSSES] for m in a] == [[m[k] for k in LOSSES] for m in b]
