"""Fault injection, data side (issue 12): a refused re-shard, concurrent writers, damaged tars counted
against img2dataset's listing, damaged manifest parts, readers that notice parts disagreeing with
_manifest.json."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402

from aimv2data.manifest.build import ManifestBuildError, build_manifest  # noqa: E402
from aimv2data.manifest.integrity import ManifestMismatch  # noqa: E402
from aimv2data.manifest.lock import output_lock  # noqa: E402
from aimv2data.manifest.tarindex import index_tar  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shards(root: Path, n_tars: int = 2, per: int = 6, listing: bool = False) -> Path:
    d = root / "shards"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_tars):
        keys = F.good_tar(d / f"{i:05d}.tar", per, start=100 * i, seed=i)
        if listing:  # img2dataset's NNNNN.parquet: every sample of the shard and its status
            pq.write_table(pa.table({"key": list(keys), "status": ["success"] * len(keys)}), d / f"{i:05d}.parquet")
    return d


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.startswith(".lock")}


# ----------------------------------------------------------------------------------------- 5: refusal

def test_refused_reshard_of_moved_tars_changes_nothing(tmp_path):
    """The tars moved, `shard` is rerun into the same manifest: refuse BEFORE writing, so the manifest
    does not end up holding every sample twice."""
    src = shards(tmp_path)
    out = tmp_path / "m"
    build_manifest([str(src)], out, progress=False, idx="none")
    before = snapshot(out)
    moved = tmp_path / "moved"
    shutil.move(str(src), str(moved))
    with pytest.raises(ManifestBuildError, match="not among the inputs"):
        build_manifest([str(moved)], out, progress=False, idx="none")
    assert snapshot(out) == before


def test_readers_notice_parts_that_disagree_with_the_manifest(tmp_path):
    from aimv2data.loader.samples import SampleTable
    from aimv2data.manifest.stats import compute_stats
    from aimv2train.train.tokenizer import iter_captions

    out = tmp_path / "m"
    build_manifest([str(shards(tmp_path))], out, progress=False, idx="none")
    SampleTable(out)  # intact: reads
    part = sorted((out / "samples").glob("*.parquet"))[0]
    shutil.copy(part, part.with_name("part-stray-00000000.parquet"))  # what the refused re-shard used to leave
    for read in (SampleTable, compute_stats, lambda m: list(iter_captions(m))):
        with pytest.raises(ManifestMismatch, match="not in _manifest.json.*part-stray"):
            read(out)
    # an old manifest without the `parts` list: the row count still gives it away
    meta = json.loads((out / "_manifest.json").read_text())
    del meta["parts"]
    (out / "_manifest.json").write_text(json.dumps(meta))
    with pytest.raises(ManifestMismatch, match="hold 18 rows, _manifest.json counts 12"):
        SampleTable(out)


# ------------------------------------------------------------------------------------------- 6: lock

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    src = shards(tmp_path)
    out = tmp_path / "m"
    code = ("import sys, time; from aimv2data.manifest.lock import output_lock\n"
            "with output_lock(sys.argv[1], argv=['aimv2', 'shard', 'first']):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ManifestBuildError, match=f"pid {holder.pid} on .*aimv2 shard first"):
            build_manifest([str(src)], out, progress=False, idx="none")
        assert not (out / "samples").exists()  # refused before any work
        with pytest.raises(ManifestBuildError, match=f"pid {holder.pid}"):
            build_manifest([str(src)], out, progress=False, idx="none", part="0/2")
    finally:
        holder.kill()
        holder.wait()
    # killed holder (kill -9): the kernel released its flock; the stale lock file is taken over
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
    r = build_manifest([str(src)], out, progress=False, idx="none")
    assert r["merged"] and json.loads((out / ".lock").read_text())["pid"] == os.getpid()


def test_parallel_parts_share_the_output_but_not_a_slice(tmp_path):
    out = tmp_path / "m"
    with output_lock(out, (0, 2)):
        with output_lock(out, (1, 2)):   # other slice: fine
            pass
        with pytest.raises(Exception, match="part 0/2 is already being sharded by pid"):
            with output_lock(out, (0, 2)):
                pass
        with pytest.raises(Exception, match="0-of-2: pid"):   # a whole run names the slice holding it
            with output_lock(out):
                pass
    with output_lock(out):   # released on exit
        pass


def test_two_concurrent_shard_runs_one_refused(tmp_path):
    """Two `aimv2 shard` processes into one output with different options: exactly one writes."""
    src = shards(tmp_path, n_tars=3, per=20)
    out = tmp_path / "m"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cli.main", "shard", str(src), "-o", str(out), "--idx", "none"]
    a = subprocess.Popen(cmd + ["--verify", "decode"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    b = subprocess.run(cmd + ["--max-aspect", "4"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, timeout=300)
    a.communicate(timeout=300)
    if a.returncode == 0 and b.returncode == 0:
        pytest.skip("the first run ended before the second started (machine too fast to overlap)")
    assert a.returncode == 0 and b.returncode == 1, b.stderr
    assert "being written by another `aimv2 shard` run: pid" in b.stderr
    assert json.loads((out / "_manifest.json").read_text())["args"]["verify"] == "decode"


# ---------------------------------------------------------------------------------- 7: damaged tars

def _report(src, out):
    return build_manifest([str(src)], out, progress=False, idx="none")


def test_garbage_over_a_header_is_resynchronised_and_counted(tmp_path):
    src = shards(tmp_path, n_tars=1, per=30, listing=True)
    tar = src / "00000.tar"
    idx = index_tar(str(tar))
    data = bytearray(tar.read_bytes())
    hdr = idx.samples[10].members["jpg"].offset - 512
    data[hdr:hdr + 4096] = os.urandom(4096)
    tar.write_bytes(bytes(data))
    r = _report(src, tmp_path / "m")
    assert r["samples"] >= 27                     # it used to stop there: 10 of 30
    lost = 30 - r["samples"]
    assert r["rejects"] - r["tar_problems"] == lost  # every lost sample is counted
    assert r["per_reason"].get("tar_damaged") == 1


def test_truncated_tar_counts_what_it_should_hold(tmp_path):
    """A tar cut in the middle: the samples after the cut are counted against img2dataset's listing."""
    src = shards(tmp_path, n_tars=1, per=32, listing=True)
    tar = src / "00000.tar"
    idx = index_tar(str(tar))
    cut = idx.samples[14].members["jpg"]
    tar.write_bytes(tar.read_bytes()[:cut.offset + cut.size // 2])
    r = _report(src, tmp_path / "m")
    assert r["samples"] == 14
    assert r["rejects"] - r["tar_problems"] == 18   # 1 tar_truncated + 17 missing_from_tar
    assert r["per_reason"]["missing_from_tar"] == 17
    from click.testing import CliRunner

    from cli.shard import shard
    out = CliRunner().invoke(shard, [str(src), "-o", str(tmp_path / "m2"), "--idx", "none"]).output
    assert "14 of 32 (43.8%)" in out and "17 samples img2dataset" in " ".join(out.split())


# ------------------------------------------------------------------------------- 9: damaged parts

def test_damaged_part_is_named_and_redone_by_shard(tmp_path, capsys):
    from aimv2data.loader.samples import SampleTable

    src = shards(tmp_path)
    out = tmp_path / "m"
    _report(src, out)
    first, second = sorted((out / "samples").glob("*.parquet"))
    raw = bytearray(first.read_bytes())
    raw[-200:-8] = os.urandom(192)                       # its footer: no reader gets past it
    first.write_bytes(bytes(raw))
    with pytest.raises(ManifestMismatch, match=f"{first.name} cannot be read.*rerun `aimv2 shard`"):
        SampleTable(out)
    raw = bytearray(second.read_bytes())
    raw[len(raw) // 4:len(raw) // 4 + 64] = os.urandom(64)   # inside the data pages: their CRCs catch it
    second.write_bytes(bytes(raw))
    r = _report(src, out)
    assert r["processed"] == 2 and r["skipped"] == 0   # it used to say "2 already done"
    assert capsys.readouterr().err.count("damaged; redoing") == 2
    assert SampleTable(out).n == 12


# ---------------------------------------------------------------------------------- interruption

@pytest.mark.slow
def test_sigterm_to_shard_exits_143_leaves_no_temp_files_and_resumes(tmp_path):
    src = shards(tmp_path, n_tars=6, per=40)
    out = tmp_path / "m"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "cli.main", "shard", str(src), "-o", str(out), "--idx", "none", "--verify", "decode"]
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not list((out / "_parts").glob("*.json")):
        time.sleep(0.02)
    if p.poll() is not None:
        pytest.skip("the run ended before it could be interrupted")
    os.killpg(p.pid, 15)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-1500:]
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert not [f for f in out.rglob("*.tmp")]
    r = subprocess.run(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, timeout=300)
    assert r.returncode == 0 and json.loads((out / "_manifest.json").read_text())["counts"]["samples"] == 240
