"""One run per run folder, the run's own tokenizer on --resume, and an unwritable folder found before any step
(issue 20, points 10-12)."""
from __future__ import annotations

import errno
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

from aimv2train.train import checkpoint as ck  # noqa: E402
from aimv2train.train.trainer import TrainError, train  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("train_safety_data"))


def cfg(data, out, **kw):
    return _train_fixtures.tiny_config(data[0], kw.pop("tok", data[1]), out, **{"steps": 4, "seed": 1, **kw})


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


# ------------------------------------------------------------------------------- 10: one run per folder

@pytest.mark.slow
def test_a_second_train_into_a_running_run_folder_refuses_naming_the_holder(data, tmp_path):
    manifest, tok = data
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "c")}
    holder = subprocess.Popen([sys.executable, "-m", "cli.main", "train", "-m", str(manifest), "-t", str(tok),
                               "--steps", "100000", "--resolution", "56", "--batch-size", "8", "--workers", "0",
                               "--save-every", "0", "--no-progress", "-o", str(run)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = run / "metrics.jsonl", time.time() + 300
        while time.time() < deadline and holder.poll() is None and not (metrics.is_file() and metrics.read_text()):
            time.sleep(0.2)
        assert holder.poll() is None, holder.communicate()[1][-2000:]
        before = _files(run)
        with pytest.raises(TrainError, match=rf"{run} is being written by another `aimv2 train` run: pid {holder.pid} "):
            train(cfg(data, run))
        with pytest.raises(TrainError, match=f"pid {holder.pid}"):
            train(cfg(data, run, resume=True))
        assert {k: v for k, v in _files(run).items() if k != "metrics.jsonl"} == \
            {k: v for k, v in before.items() if k != "metrics.jsonl"}
    finally:
        holder.send_signal(signal.SIGTERM)
        _, err = holder.communicate(timeout=300)
    assert holder.returncode == 143, err[-2000:]
    # the holder is gone, so its lock is too (the kernel drops it): the run continues
    step = json.loads((run / "summary.json").read_text())["step"]
    s = train(cfg(data, run, steps=100000, seed=0, resume=True, stop_at=step + 1))
    assert s["status"] == "stopped" and s["step"] == step + 1


# ------------------------------------------------------------------ 11: --resume checks the tokenizer

@pytest.fixture(scope="module")
def other_tok(data, tmp_path_factory):
    """A BPE tokenizer of the same vocabulary size as the fixture's unigram one: other ids, same shapes."""
    from aimv2train.train.tokenizer import Tokenizer, train_tokenizer

    path, size = tmp_path_factory.mktemp("bpe") / "bpe.model", Tokenizer(data[1]).vocab_size
    train_tokenizer(data[0], path, vocab_size=size, model_type="bpe")
    assert Tokenizer(path).vocab_size == size
    return path


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(data, other_tok, tmp_path):
    train(cfg(data, tmp_path, stop_at=2))
    before = _files(tmp_path)
    with pytest.raises(TrainError, match=rf"--resume: {other_tok} is not the tokenizer .*step_00000002.pt was "
                                         r"trained with \(sha256 "):
        train(cfg(data, tmp_path, resume=True, tok=other_tok))
    assert _files(tmp_path) == before
    assert train(cfg(data, tmp_path, resume=True))["status"] == "done"   # its own tokenizer, under any name


def _rewrite(path: Path, edit) -> None:
    """The checkpoint as an older version wrote it; replaced, not overwritten (readers memory-map it)."""
    from aimv2data.atomic import atomic_torch_save

    state = torch.load(path, map_location="cpu", weights_only=True)
    edit(state)
    atomic_torch_save(state, path)


def test_resume_of_a_checkpoint_without_the_hash(data, other_tok, tmp_path, capsys):
    """Checkpoints written before the hash was stored: the tokenizer bytes they carry are compared; one
    carrying neither is accepted with a one-line notice."""
    train(cfg(data, tmp_path, stop_at=2))
    (path,) = [p for _, p in ck.list_checkpoints(tmp_path / "checkpoints")]
    _rewrite(path, lambda s: s["train"].pop("tokenizer_sha256"))
    with pytest.raises(TrainError, match="is not the tokenizer"):
        train(cfg(data, tmp_path, resume=True, tok=other_tok))
    _rewrite(path, lambda s: s.pop("tokenizer"))
    capsys.readouterr()
    assert train(cfg(data, tmp_path, resume=True))["status"] == "done"
    assert "does not record its tokenizer; assuming" in capsys.readouterr().err


# ------------------------------------------------------------ 12: an unwritable folder, before any step

def _read_only(monkeypatch, folder: Path) -> None:
    """`folder` refuses new files, as on a read-only mount. chmod is not enough when the tests run as root,
    so the refusal is the kernel's EROFS, raised where a file would be created in it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    real_open = os.open

    def refusing(path, flags, *args, **kw):
        if flags & (os.O_CREAT | getattr(os, "O_TMPFILE", 0)) and Path(os.fsdecode(path)).parent == folder \
                or Path(os.fsdecode(path)) == folder and flags & getattr(os, "O_TMPFILE", 0):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", refusing)


def test_a_read_only_checkpoints_folder_is_refused_before_the_first_step(data, tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _read_only(monkeypatch, ckpts)
    try:
        with pytest.raises(TrainError) as e:
            train(cfg(data, tmp_path))
    finally:
        ckpts.chmod(0o755)
    msg = str(e.value)
    assert msg.startswith(f"{ckpts} is not writable (") and "\n" not in msg and "choose another --output" in msg
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "run.json").exists()
