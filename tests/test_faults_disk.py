"""Full disks (issue 12, item 13), on a real full filesystem: a small tmpfs mounted for the test when it
runs as root (`mount -t tmpfs -o size=...`). Without root (or where mount is refused) the same tests run
on a simulation: the writes raise OSError(ENOSPC) as a full disk makes them (documented in each test)."""
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _shard_fixtures as F  # noqa: E402
import _train_fixtures  # noqa: E402

from aimv2train.train.trainer import TrainError, train  # noqa: E402

torch.set_num_threads(1)


@contextlib.contextmanager
def small_fs(path: Path, size: str):
    """A tmpfs of `size` at `path`; yields True when mounted, False when this machine cannot (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                               capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave: int) -> None:
    """Fill the filesystem of `path` up to `leave` free bytes."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("faults_disk_data"))


def test_train_on_a_full_disk_says_so_in_one_line_and_leaves_no_temp_files(data, tmp_path, monkeypatch):
    manifest, tok = data
    mnt = tmp_path / "fs"
    with small_fs(mnt, "2m") as real:
        if not real:  # simulation: every checkpoint write fails as torch's zip writer does on ENOSPC
            def full(obj, f, *a, **kw):
                Path(f).write_bytes(b"x" * 100)
                raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1010560 vs 1010448")
            monkeypatch.setattr(torch, "save", full)
        out = mnt / "run"
        cfg = _train_fixtures.tiny_config(manifest, tok, out, steps=3)
        with pytest.raises(TrainError, match="no space left on the filesystem of .*free space and rerun the same "
                                             "command with --resume") as e:
            train(cfg)
        assert "\n" not in str(e.value)
        assert leftovers(mnt) == []
        assert (out / "run.json").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_train_cannot_even_write_run_json(data, tmp_path, monkeypatch):
    """Disk already full at start: one line, and no empty metrics.jsonl nor .run.json.tmp behind."""
    manifest, tok = data
    mnt = tmp_path / "fs"
    with small_fs(mnt, "256k") as real:
        out = mnt / "run"
        out.mkdir()
        if real:
            fill(mnt, 0)
        else:  # simulation: the first file write fails with ENOSPC
            real_write = Path.write_text

            def full(self, *a, **kw):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(Path, "write_text", full)
        cfg = _train_fixtures.tiny_config(manifest, tok, out, steps=3)
        with pytest.raises(TrainError, match="no space left"):
            train(cfg)
        if not real:
            monkeypatch.setattr(Path, "write_text", real_write)
        assert sorted(p.name for p in out.iterdir()) == []


def test_shard_on_a_full_disk_leaves_no_temp_files_and_resumes(tmp_path, monkeypatch):
    """Tars and manifest on a filesystem with no room left: each tar fails with a reason, no temp file is
    left (beside the tars either, with --idx beside), and after freeing space the rerun finishes."""
    from aimv2data.manifest.build import build_manifest

    mnt = tmp_path / "fs"
    with small_fs(mnt, "4m") as real:
        shards = mnt / "shards"
        shards.mkdir()
        for i in range(3):
            F.good_tar(shards / f"{i:05d}.tar", 8, start=10 * i, seed=i)
        out = mnt / "m"
        out.mkdir()
        if real:
            fill(mnt, 0)
        else:  # simulation: every parquet / idx write fails with ENOSPC
            import aimv2data.manifest.build as build
            import aimv2data.manifest.schema as schema

            def full(*a, **kw):
                raise OSError(errno.ENOSPC, "No space left on device")
            monkeypatch.setattr(schema.pq, "write_table", full)
            monkeypatch.setattr(build, "write_dali_index", full)
        r = build_manifest([str(shards)], out, progress=False, idx="beside")
        assert len(r["failed"]) == 3 and all("No space left" in err for _, err in r["failed"])
        assert leftovers(mnt) == []
        if real:
            (mnt / "filler").unlink()
        else:
            monkeypatch.undo()
        r = build_manifest([str(shards)], out, progress=False, idx="beside")
        assert r["merged"] and r["samples"] == 24 and leftovers(mnt) == []
