"""CPU thread hygiene: torch's intra-op pool sized to this process's CPU affinity and the ranks sharing
the machine, unless the user chose (--threads, OMP_NUM_THREADS); the --attention choice checked at start-up."""
import os

import pytest
import torch

from aimv2train.train.distributed import cpu_threads


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def eight_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    for var in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_affinity_divided_among_local_ranks(eight_cpus):
    assert cpu_threads()[0] == 8 and torch.get_num_threads() == 8
    eight_cpus.setenv("LOCAL_WORLD_SIZE", "3")
    assert cpu_threads()[0] == 2 and torch.get_num_threads() == 2  # 8 // 3: never more than the share
    eight_cpus.setenv("LOCAL_WORLD_SIZE", "16")
    assert cpu_threads()[0] == 1


def test_explicit_choices_win(eight_cpus):
    assert cpu_threads(3) == (3, "--torch-threads") and torch.get_num_threads() == 3
    torch.set_num_threads(5)
    eight_cpus.setenv("OMP_NUM_THREADS", "5")
    eight_cpus.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads() == (5, "OMP_NUM_THREADS")
    with pytest.raises(ValueError, match="--torch-threads must be >= 1"):
        cpu_threads(0)


def test_torchruns_blanket_one_thread_is_not_taken_as_a_choice(eight_cpus):
    for k, v in {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "WORLD_SIZE": "2"}.items():
        eight_cpus.setenv(k, v)
    assert cpu_threads()[0] == 4


def test_attention_flag_is_checked_before_the_run_starts(tmp_path):
    from aimv2train.train.trainer import TrainConfig, TrainError, train

    base = dict(manifest=str(tmp_path / "m"), tokenizer=str(tmp_path / "t.model"), out=str(tmp_path / "run"))
    with pytest.raises(TrainError, match="--attention must be one of"):
        train(TrainConfig(**base, attention="flash"))
    with pytest.raises(TrainError, match="--attention flex needs a CUDA device"):
        train(TrainConfig(**base, attention="flex", device="cpu"))
    assert not (tmp_path / "run").exists()
