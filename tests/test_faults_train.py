"""Fault injection, training side (issue 12): preemption signals to the whole process group with loader
workers, exit codes, damaged checkpoints, a torn metrics.jsonl, hidden replacements, caption-less
manifests. Each test reproduces a fault that once lost or hid work."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from aimv2train.train import checkpoint as ck  # noqa: E402
from aimv2train.train.trainer import TrainError, train  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("faults_train_data"))


def cfg(data, out, manifest=None, **kw):
    return _train_fixtures.tiny_config(manifest or data[0], data[1], out, **{"steps": 12, "seed": 3, **kw})


def damage(path: Path, at: float = 0.5, n: int = 64) -> None:
    """Overwrite n bytes in the middle of a file with random bytes (size unchanged)."""
    raw = bytearray(path.read_bytes())
    i = int(len(raw) * at)
    raw[i:i + n] = os.urandom(n)
    path.write_bytes(bytes(raw))


def snapshot(root: Path) -> dict:
    """Every file under root but the run lock, which records whoever holds it now."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*")
            if p.is_file() and p.name != ".lock"}


# ------------------------------------------------------------------------------------ 1, 2: signals

def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": kw.pop("cache")}
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigterm_to_process_group_with_workers_saves_and_exits_143(data, tmp_path):
    """Slurm preemption / scancel: SIGTERM to every process of the group, loader workers included. The
    workers must not die of it (the DataLoader would raise mid-step); the trainer saves after the step
    and exits 143, so `train && export` stops and a scheduler requeues."""
    manifest, tok = data
    run = tmp_path / "run"
    p = _cli("train", "-m", str(manifest), "-t", str(tok), "--steps", "400", "--resolution", "56", "--batch-size",
             "8", "--workers", "2", "--save-every", "0", "--no-progress", "-o", str(run), start_new_session=True,
             cache=str(tmp_path / "cache"))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1][-2000:]
    os.killpg(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert "aimv2 train: SIGTERM: saving a checkpoint after this step" in err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert [s for s, _ in ck.list_checkpoints(run / "checkpoints")] == [steps[-1]]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


def test_sigint_exit_code_is_130(data, tmp_path, monkeypatch, capsys):
    _train_fixtures.signal_on_forward(monkeypatch, 2, signal.SIGINT)
    s = train(cfg(data, tmp_path))
    assert (s["status"], s["step"], s["signal"], s["exit_code"]) == ("interrupted", 2, "SIGINT", 130)
    assert "SIGINT: saving a checkpoint" in capsys.readouterr().err


def test_cli_interrupted_run_exits_non_zero(data, tmp_path, monkeypatch):
    """The CLI turns an interrupted summary into its exit code (0 would let `train && export` go on)."""
    from click.testing import CliRunner

    from cli.train import train as train_cmd

    _train_fixtures.signal_on_forward(monkeypatch, 2, signal.SIGTERM)
    manifest, tok = data
    r = CliRunner().invoke(train_cmd, ["-m", str(manifest), "-t", str(tok), "--steps", "12", "--resolution", "56",
                                       "--batch-size", "8", "--workers", "0", "--no-progress", "--peak-flops",
                                       "1e11", "-o", str(tmp_path / "run")])
    assert r.exit_code == 143, r.output


def _signal_on_calls(monkeypatch, target, name, calls: dict) -> None:
    """Send calls[n] (a signal) to this process on the n-th call of target.name, then run the real one."""
    real, seen = getattr(target, name), []

    def wrapper(*args, **kwargs):
        seen.append(1)
        if len(seen) in calls:
            os.kill(os.getpid(), calls[len(seen)])
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def test_repeated_sigterm_mid_step_and_mid_save_counts_as_one(data, tmp_path, monkeypatch, capsys):
    """SIGTERM, its forwarded copy in the same step, and a second scancel during the checkpoint write: one
    request; the checkpoint is written and the run ends interrupted, 143 (it used to stop at the second
    signal without a checkpoint)."""
    from aimv2train.train import trainer

    _train_fixtures.signal_on_forward(monkeypatch, 2, signal.SIGTERM)
    _signal_on_calls(monkeypatch, trainer.LossModule, "forward", {2: signal.SIGTERM})  # the forwarded copy
    _signal_on_calls(monkeypatch, ck, "atomic_torch_save", {1: signal.SIGTERM})      # mid-save
    s = train(cfg(data, tmp_path))
    assert (s["status"], s["step"], s["exit_code"]) == ("interrupted", 2, 143)
    assert [st for st, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [2]
    assert capsys.readouterr().err.count("SIGTERM again: already stopping") == 2


def test_ctrl_c_twice_still_stops_at_once(data, tmp_path, monkeypatch):
    """A person's second Ctrl-C (after the grace window for forwarded copies) stops without a checkpoint."""
    from aimv2train.train import preempt, trainer

    monkeypatch.setattr(preempt, "REPEAT_GRACE_S", -1.0)  # every repeat is past the window
    _train_fixtures.signal_on_forward(monkeypatch, 2, signal.SIGINT)
    _signal_on_calls(monkeypatch, trainer.LossModule, "forward", {2: signal.SIGINT})
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        train(cfg(data, tmp_path))
    assert ck.list_checkpoints(tmp_path / "checkpoints") == []


def test_every_rank_exits_with_the_interrupted_code(tmp_path, monkeypatch):
    """Under torchrun a rank other than 0 prints no summary but exits 143 too (it used to return 0)."""
    from click.testing import CliRunner

    from aimv2train.train import trainer
    from cli.train import train as train_cmd

    monkeypatch.setattr(trainer, "train", lambda cfg: {"rank": 1, "status": "interrupted", "exit_code": 143})
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"x")
    (tmp_path / "_manifest.json").write_text("{}")   # a manifest to the CLI's look before the (faked) trainer
    r = CliRunner().invoke(train_cmd, ["-m", str(tmp_path), "-t", str(tok), "-o", str(tmp_path / "run")])
    assert r.exit_code == 143 and r.output == "", r.output


# ----------------------------------------------------------------------------- 3, 4: damaged checkpoints

def test_damaged_checkpoint_is_detected_and_the_previous_one_used(data, tmp_path, capsys):
    """Random bytes inside step_8.pt pass torch.load; the archive's CRC-32s catch them and the run resumes
    from step_4 with a one-line notice."""
    train(cfg(data, tmp_path, save_every=4, keep=0, stop_at=8))
    newest = tmp_path / "checkpoints" / "step_00000008.pt"
    damage(newest)
    torch.load(newest, weights_only=True)  # the fault: torch.load alone does not notice
    with pytest.raises(ck.CheckpointDamaged, match="CRC mismatch|damaged"):
        ck.read_checkpoint(newest)
    capsys.readouterr()
    s = train(cfg(data, tmp_path, save_every=4, keep=0, resume=True))
    err = capsys.readouterr().err
    assert s["resumed_from"] == 4 and s["status"] == "done"
    assert "resuming from step_00000004.pt" in err and len([ln for ln in err.splitlines() if "damaged" in ln]) == 1


def test_all_checkpoints_damaged_refuses_and_touches_nothing(data, tmp_path):
    train(cfg(data, tmp_path, save_every=2, keep=0, stop_at=4))
    for _, p in ck.list_checkpoints(tmp_path / "checkpoints"):
        damage(p)
    before = snapshot(tmp_path)
    with pytest.raises(TrainError, match="none of the 2 checkpoints .* is intact.*nothing was changed"):
        train(cfg(data, tmp_path, save_every=2, keep=0, resume=True))
    assert snapshot(tmp_path) == before


def test_truncated_checkpoint_is_damaged_too(tmp_path):
    p = tmp_path / "step_00000001.pt"
    torch.save({"step": 1, "w": torch.zeros(1000)}, p)
    p.write_bytes(p.read_bytes()[:-200])
    with pytest.raises(ck.CheckpointDamaged):
        ck.read_checkpoint(p)


# ---------------------------------------------------------------------------------- 8: torn metrics

def test_torn_metrics_last_line_is_dropped_on_resume(data, tmp_path):
    """Disk full mid-write leaves half a JSON line; --resume must not fail on it (the checkpoint is fine)."""
    train(cfg(data, tmp_path, stop_at=4))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.1, "loss_img"')
    s = train(cfg(data, tmp_path, resume=True))
    assert s["status"] == "done"
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_damaged_middle_metrics_line_is_named(tmp_path):
    from aimv2train.train.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        read_metrics(tmp_path)


# ------------------------------------------------------------------------------------- 16: file modes

def test_checkpoints_respect_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        train(cfg(data, tmp_path, steps=2))
    finally:
        os.umask(old)
    for _, p in ck.list_checkpoints(tmp_path / "checkpoints"):
        assert p.stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- 10, 12: what the data does

def _variant(data, name: str, edit) -> Path:
    """A copy of the fixture manifest beside it (relative shard paths still resolve) with its samples
    parts rewritten by `edit(df) -> df`."""
    import polars as pl

    manifest, _ = data
    dst = manifest.parent / name
    if not dst.exists():
        shutil.copytree(manifest, dst)
        for f in sorted((dst / "samples").glob("*.parquet")):
            edit(pl.read_parquet(f)).write_parquet(f)
    return dst


def test_replacements_are_visible_and_warned_about(data, tmp_path, capsys):
    """A third of the rows of the larger buckets point at a tar that is gone: every step's replacements are in
    metrics.jsonl,
    the summary gives the share, and above --warn-replaced the run ends with a warning."""
    import polars as pl

    def lose_a_tar(df):
        # a third of the rows of every bucket of 5 or more: each keeps good rows to replace them with
        gone = (pl.int_range(pl.len()).over("bucket") % 3 == 0) & (pl.len().over("bucket") >= 5)
        return df.with_columns(pl.when(gone).then(pl.lit("../shards/deleted.tar")).otherwise(pl.col("shard"))
                               .alias("shard"))

    manifest = _variant(data, "lost_tar", lose_a_tar)
    s = train(cfg(data, tmp_path, manifest=str(manifest), steps=4))
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("replaced" in r for r in recs) and sum(r["replaced"] for r in recs) == s["replaced"] > 0
    assert s["draws"] == 32 and s["replaced_share"] == s["replaced"] / 32 > 0.02
    assert "deleted.tar" in json.dumps(s["replaced_examples"])
    err = capsys.readouterr().err
    assert "aimv2 train: warning:" in err and "above --warn-replaced 2%" in err
    s = train(cfg(data, tmp_path / "quiet", manifest=str(manifest), steps=2, warn_replaced=0.9))
    assert "replaced_warning" not in s and "warning" not in capsys.readouterr().err


def test_train_refuses_a_manifest_without_captions(data, tmp_path):
    import polars as pl

    def drop_captions(df):
        return df.with_columns(pl.lit(None, dtype=pl.String).alias("caption"),
                               pl.lit(None, dtype=pl.List(pl.String)).alias("syn_demo"))

    manifest = _variant(data, "no_captions", drop_captions)
    with pytest.raises(TrainError, match="none of its 80 samples has a caption.*--allow-no-captions"):
        train(cfg(data, tmp_path / "a", manifest=str(manifest), steps=2))
    assert not (tmp_path / "a" / "run.json").exists()
    s = train(cfg(data, tmp_path / "b", manifest=str(manifest), steps=2, allow_no_captions=True))
    assert s["status"] == "done"


# ------------------------------------------------------------------------ 16, 17: for the people who run it

def test_no_progress_prints_periodic_log_lines(data, tmp_path, capsys):
    train(cfg(data, tmp_path, steps=4, log_interval=1e-9))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("aimv2 train: step ")]
    assert len(lines) == 4 and lines[-1].startswith("aimv2 train: step 4/4 (100.0%)")
    assert all("images/s" in ln and "replaced 0" in ln and "ETA" in ln for ln in lines)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    from aimv2data.atomic import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "x.npy", lambda t: Path(t).write_bytes(b"1"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.npy").stat().st_mode & 0o777 == mode


# ----------------------------------------------------------------------------------- 19: MFU reference

def test_mfu_reference_is_stable_between_runs(tmp_path, monkeypatch):
    """One matmul measurement per start ranged 4x run to run; the reference is the best ever measured on
    the machine (cached), so a slow start does not inflate MFU."""
    from aimv2train.train import metrics

    cache = tmp_path / "peak.json"
    for measured in (200e9, 75e9, 150e9):
        monkeypatch.setattr(metrics, "matmul_peak", lambda *a, m=measured, **k: m)
        peak, source = metrics.reference_peak(torch.device("cpu"), torch.float32, cache=cache)
        assert peak == 200e9 and str(cache) in source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    peak, source = metrics.reference_peak(torch.device("cuda"), torch.bfloat16)
    assert (peak, source) == (989.4e12, "datasheet bf16 dense peak of NVIDIA H100 80GB HBM3")


def test_export_refuses_a_damaged_checkpoint(data, tmp_path):
    from aimv2train.eval.export import export
    from aimv2train.eval.weights import WeightsError

    train(cfg(data, tmp_path / "run", steps=2))
    (p,) = [p for _, p in ck.list_checkpoints(tmp_path / "run" / "checkpoints")]
    damage(p)
    with pytest.raises(WeightsError, match="CRC mismatch|damaged"):
        export(p, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
