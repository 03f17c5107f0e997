"""scripts/dali_chunks.sh, the way the DALI wheels reach a machine that cannot download (64 MiB per
call): split here, parts copied one per call, join + sha256 check there, pip install --no-deps --target.
Rehearsed on small dummy files; the real wheels' rehearsal is in benchmarks/RESULTS.md."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dali_chunks.sh"

pytestmark = pytest.mark.skipif(shutil.which("sha256sum") is None or shutil.which("split") is None,
                                reason="needs coreutils (split, sha256sum)")


def sh(*args, check=True):
    r = subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def carry(chunks: Path, remote: Path) -> None:
    """What the consecutive calls do: each copies its part (and the sums) into the same folder."""
    remote.mkdir(parents=True, exist_ok=True)
    for f in sorted(chunks.iterdir()):
        shutil.copy(f, remote / f.name)


def test_split_join_verify_round_trip_and_damage_is_named(tmp_path):
    blob = tmp_path / "src" / "big.whl"
    blob.parent.mkdir()
    blob.write_bytes(os.urandom(1_000_000))
    sh("split", blob, tmp_path / "chunks", "300K")
    parts = sorted((tmp_path / "chunks").glob("big.whl.part*"))
    assert [p.name[-2:] for p in parts] == ["00", "01", "02", "03"]
    assert all(p.stat().st_size <= 300 * 1024 for p in parts)
    remote = tmp_path / "remote"
    carry(tmp_path / "chunks", remote)
    sh("join", remote, remote)
    assert (remote / "big.whl").read_bytes() == blob.read_bytes()
    assert "OK" in sh("verify", remote).stdout

    # a part lost in transfer, then a damaged one: join refuses and says which is wrong
    (remote / "big.whl.part02").unlink()
    r = sh("join", remote, remote, check=False)
    assert r.returncode != 0 and "3 of 4 parts" in r.stderr
    (remote / "big.whl.part02").write_bytes(b"x" * 10)
    r = sh("join", remote, remote, check=False)
    assert r.returncode != 0 and "damaged" in r.stderr


def _wheel(folder: Path, name: str, body: str) -> Path:
    """A minimal pure-Python wheel (what pip needs to install one: module, METADATA, WHEEL, RECORD)."""
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}.py", body)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return whl


def test_a_folder_of_wheels_travels_as_one_tar_and_installs_into_a_target(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "fakedali", "from fakedep import VALUE\n__version__ = VALUE\n")
    _wheel(wheels, "fakedep", "VALUE = '2.4.0'\n" + "# padding\n" * 20000)
    sh("split", wheels, tmp_path / "chunks", "64K")
    names = sorted(p.name for p in (tmp_path / "chunks").iterdir())
    assert "wheels.tar" not in names and len([n for n in names if ".part" in n]) >= 2
    remote = tmp_path / "remote"
    carry(tmp_path / "chunks", remote)
    sh("join", remote, remote)
    target = tmp_path / "pkg"
    out = sh("install", remote / "wheels.tar", target).stdout
    assert "installed 2 wheel(s)" in out
    r = subprocess.run([sys.executable, "-c", "import fakedali; print(fakedali.__version__)"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert r.stdout.strip() == "2.4.0", r.stderr


def test_usage_errors_are_one_line(tmp_path):
    r = sh("split", tmp_path / "missing.whl", tmp_path / "out", check=False)
    assert r.returncode != 0 and "no such file" in r.stderr
    r = sh("frobnicate", check=False)
    assert r.returncode != 0 and "unknown mode" in r.stderr
