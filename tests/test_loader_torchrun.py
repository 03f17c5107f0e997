"""The loader under torchrun (gloo, CPU, 127.0.0.1 only): two "nodes" of one process each meeting at a
c10d rendezvous train native-resolution steps, each reading only its share of the manifest; and runs
resumed at another world size (2 -> 1, 1 -> 2) continue the data order with the documented bound."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo",
       "MASTER_ADDR": "127.0.0.1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("torchrun_data"), tars=4)


def _train_args(data, out, *extra):
    manifest, tok = data
    return ["-m", "cli.main", "train", "-m", str(manifest), "-t", str(tok), "-o", str(out), "--model", "tiny",
            "--steps", "6", "--native-res", "--batch-patches", "4096", "--stage", "pretrain", "--workers", "0",
            "--seed", "1", "--no-progress", "--save-every", "0", *extra]


def _wait(procs, timeout=300):
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pytest.fail("torchrun timed out")
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, o[-3000:] + e[-3000:]
    return outs


def _spawn(cmd):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def torchrun(data, out, nproc, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *_train_args(data, out, *extra)]
    return _wait([_spawn(cmd)])[0]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(ckpt):
    return torch.load(ckpt, weights_only=True)["ranks"]


def _metrics(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_two_nodes_each_read_only_their_share(data, tmp_path):
    port = _free_port()
    procs = [_spawn([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                     "--node_rank", str(k), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                     "--rdzv_id", "i13", "--max_restarts", "0", *_train_args(data, tmp_path / "run")])
             for k in (0, 1)]
    _wait(procs)
    ranks = _ranks(tmp_path / "run/checkpoints/step_00000006.pt")
    assert len(ranks) == 2
    total = json.loads((data[0] / "_manifest.json").read_text())["counts"]["samples"]
    # each rank's reads: (source, epoch) -> chunks and rows; in every epoch both ranks read, the shares
    # are disjoint and together the whole manifest, and a rank read nothing but its shares
    reads = [{(x["source"], x["epoch"]): x for x in r["loader"]["stats"]["reads"]} for r in ranks]
    common = set(reads[0]) & set(reads[1])
    assert common
    for k in common:
        a, b = reads[0][k], reads[1][k]
        assert not set(a["chunks"]) & set(b["chunks"]) and len(a["chunks"]) == len(b["chunks"]) == 2
        assert a["rows"] + b["rows"] == total and 0 < a["rows"] < total
    for r, rd in zip(ranks, reads):
        assert r["loader"]["stats"]["rows_read"] == sum(x["rows"] for x in rd.values())
    m = _metrics(tmp_path / "run")
    assert [x["step"] for x in m] == list(range(1, 7)) and all("sources" in x for x in m)


@pytest.mark.parametrize("w_from,w_to", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(data, tmp_path, w_from, w_to):
    run = tmp_path / "run"
    torchrun(data, run, w_from, "--stop-at", "3")
    before = _ranks(run / "checkpoints/step_00000003.pt")[0]["loader"]
    _, err = torchrun(data, run, w_to, "--resume")
    assert "every source starts its next epoch" in err              # the one-line notice, not a silent restart
    # the global batch follows the ranks (per-rank C kept), and the notice says so (issue 21 point 8)
    assert f"the global batch changes from {4096 * w_from} to {4096 * w_to} patches per step" in err
    m = _metrics(run)
    assert [x["step"] for x in m] == list(range(1, 7))
    # B = C // A images of a bucket's grid: a step's patches are at most C per rank and near it
    assert all(0.75 * 4096 * w_to < x["patches"] <= 4096 * w_to for x in m[3:]), [x["patches"] for x in m]
    after = _ranks(run / "checkpoints/step_00000006.pt")
    assert len(after) == w_to and all(r["loader"]["world_size"] == w_to for r in after)
    for src, e in before["snapshot"]["epochs"].items():              # the bound: each source's next epoch
        assert all(r["loader"]["snapshot"]["epochs"][src] >= e + 1 for r in after)
    assert after[0]["loader"]["t"] == 3 + 3                           # the global step continued


def test_resume_at_another_world_size_can_keep_the_global_batch(data, tmp_path):
    """--keep-global-batch: 2 ranks x 4096 patches resumed on 1 rank trains 8192 patches per step, as before;
    resumed again at the same size it stays (the rescaled per-rank batch is the checkpoint's)."""
    run = tmp_path / "run"
    torchrun(data, run, 2, "--stop-at", "3")
    _, err = torchrun(data, run, 1, "--resume", "--keep-global-batch", "--stop-at", "5")
    assert "--keep-global-batch keeps 8192 patches per step, --batch-patches 4096 -> 8192 per rank" in err
    torchrun(data, run, 1, "--resume", "--keep-global-batch")
    m = _metrics(run)
    assert [x["step"] for x in m] == list(range(1, 7))
    assert all(0.75 * 8192 < x["patches"] <= 8192 for x in m), [x["patches"] for x in m]  # B = C // A per rank
    assert json.loads((run / "run.json").read_text())["train"]["batch_patches"] == 8192
