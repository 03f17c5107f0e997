"""The GPU check's own home (aimv2train/gpucheck/): `aimv2 bench gpu --help` is a fast Click command, the trainer
part's payload of real photos is built here and checked there, and the whole device sequence
(scripts/gpu_check.sh: parts carried call by call, joined, installed, the real `aimv2 train` runs) is
rehearsed on CPU with --dry-run. tests/test_bench_gpu.py covers the other parts."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

HELP_WITHOUT_TORCH = """
import atexit, sys
atexit.register(lambda: print("torch imported" if "torch" in sys.modules else "torch not imported"))
sys.argv = ["aimv2", "bench", "gpu", "--help"]
from cli.main import main
main()
"""


def test_bench_gpu_help_is_a_click_command_that_imports_no_torch():
    r = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: aimv2 bench gpu [OPTIONS]"), r.stdout[:200]  # click's, like every command
    for flag in ("--dry-run", "--prepare DIR", "--data DIR", "--parts PART,...", "--budget SECONDS", "-h, --help"):
        assert flag in r.stdout, flag
    assert r.stdout.rstrip().endswith("torch not imported")


def test_the_plain_entry_needs_no_click_and_refuses_unknown_parts_like_click():
    code = ("import sys\nsys.modules['click'] = None\nfrom aimv2train.gpucheck.runner import main\n"
            "main(['--parts', 'env,gpu_magic'])\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "unknown ['gpu_magic']" in r.stderr
    r = subprocess.run([sys.executable, "-m", "cli.main", "bench", "gpu", "--parts", "env,gpu_magic"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown ['gpu_magic']" in r.stderr


def test_prepare_writes_real_photos_within_the_limit_and_load_refuses_a_changed_file(tmp_path):
    from aimv2train.gpucheck import payload

    info = payload.prepare(tmp_path / "p", max_mb=1.5)
    assert info["bytes"] <= 1.5e6 and info["images"] >= 8 and info["photos"] >= 10
    assert 0.1 < info["megapixels_mean"] < 0.6   # long sides 400-900 px, 4:3
    got = payload.load(tmp_path / "p")
    assert Path(got["manifest"], "_manifest.json").is_file() and Path(got["tokenizer"]).is_file()
    moved = tmp_path / "moved"   # carried elsewhere: shard paths are relative to the manifest
    shutil.move(tmp_path / "p", moved)
    assert payload.load(moved)["manifest"] == str(moved / "manifest")
    with pytest.raises(FileExistsError):
        payload.prepare(moved)
    tar = sorted((moved / "shards").glob("*.tar"))[0]
    tar.write_bytes(tar.read_bytes()[:-10])
    with pytest.raises(ValueError, match="changed since --prepare"):
        payload.load(moved)


def test_native_seed_bounds_the_areas_the_run_draws():
    from aimv2data.loader.sampler import AREA, area_exponent, unit
    from aimv2train.gpucheck.trainer import native_seed

    for steps, areas, largest in ((13, 2, 4096), (3, 1, 128)):
        seed = native_seed(steps, areas, largest)
        drawn = {2 ** area_exponent(unit(seed, t, AREA)) for t in range(steps)}
        assert len(drawn) <= areas and max(drawn) <= largest
    assert len({area_exponent(unit(0, t, AREA)) for t in range(13)}) > 2   # the bound is not vacuous


def test_watch_counts_graphs_and_recompiles_of_a_compiled_function(tmp_path):
    import torch

    from aimv2train.gpucheck.trainer import _watch

    f = torch.compile(lambda x: (x * 2).sin().sum(), dynamic=False)
    with _watch(torch.device("cpu"), tmp_path / "metrics.jsonl", 0, 1, sigterm=False) as seen:
        f(torch.randn(4))
        f(torch.randn(5))   # another shape: one recompile
        f(torch.randn(4))
    assert seen["compile"]["graphs"] == 2 and seen["compile"]["recompiles"] == 1 and seen["compile"]["compile_s"] > 0
    assert "size mismatch" in seen["compile"]["recompile_reasons"][0]
    assert seen["syncs"]["per_step"] is None and "CUDA" in seen["syncs"]["reason"]


def _wheel(folder: Path, name: str) -> None:
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}.py", "VALUE = 'carried'\n" + "# padding\n" * 5000)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils (split, sha256sum)")
def test_the_device_sequence_rehearsed_on_cpu(tmp_path):
    """scripts/gpu_check.sh as the device calls run it, on CPU: the payload from --prepare, a wheel bundle
    carried one part per call (`receive`), then `run`: join, install, the check (--dry-run) with the real
    `aimv2 train` on the payload: fixed and native runs, SIGTERM -> checkpoint -> --resume."""
    here, there, out = tmp_path / "here", tmp_path / "there", tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "GPUCHECK_HERE": str(here), "GPUCHECK_TMP": str(there),
           "OUT": str(out), "GPUCHECK_DRY": "1", "GPUCHECK_PARTS": "env,trainer", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([sys.executable, "-m", "aimv2train.gpucheck", "--prepare", str(here / "payload"), "--max-mb",
                    "1.5"], cwd=ROOT, check=True, capture_output=True, timeout=300)
    wheels = tmp_path / "core"
    wheels.mkdir()
    _wheel(wheels, "gpucheck_carried")
    bundle = tmp_path / "bundle"
    subprocess.run(["bash", str(ROOT / "scripts" / "dali_chunks.sh"), "split", str(wheels), str(bundle / "core"),
                    "16K"], check=True, capture_output=True)
    parts = sorted((bundle / "core").glob("*.tar.part*"))
    assert len(parts) >= 2
    shutil.copytree(bundle, here, dirs_exist_ok=True)
    calls = subprocess.run(["bash", str(SCRIPT), "calls"], env=env, capture_output=True, text=True, check=True)
    lines = calls.stdout.strip().splitlines()
    assert len(lines) == len(parts) and '".gpucheck/payload"' in lines[-1] and "run 540" in lines[-1]
    for i, part in enumerate(parts):   # what each call carries: its part and the sums (the payload: the last)
        for p in parts:
            if p != part:
                (here / "core" / p.name).unlink(missing_ok=True)
        shutil.copy(part, here / "core" / part.name)
        mode = ["receive"] if i < len(parts) - 1 else ["run", "300"]
        r = subprocess.run(["bash", str(SCRIPT), *mode], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "installed 1 wheel(s)" in r.stdout and (there / "site" / "gpucheck_carried.py").is_file()
    result = json.loads((out / "bench_gpu.json").read_text())
    trainer = result["parts"]["trainer"]
    assert trainer["status"] == "ok", trainer
    assert trainer["payload"]["images"] >= 8
    for res in ("fixed", "native"):
        run = trainer["runs"][res]
        assert run["status"] == "ok", (res, run)
        assert run["images_per_s"] > 0 and run["synthetic"]["images_per_s"] > 0 and run["efficiency"] > 0
        assert run["data_wait_ms_mean"] >= 0 and run["peak_memory"]["estimate_gib"] > 0
        assert run["compile"]["recompiles"] == 0 and run["devices"].startswith("rank 0: model cpu")
    assert trainer["runs"]["native"]["config"]["init"], "the native stage starts from the fixed run's weights"
    sig = trainer["runs"]["fixed"]["sigterm_resume"]
    assert sig["status"] == "ok" and sig["exit_code"] == 143 and sig["resumed_from"] == sig["stopped_at"]
    assert (out / "gpu_check.log").is_file() and "aimv2 bench gpu (dry run" in (out / "gpu_check.log").read_text()
    assert not list((there / "work").rglob("*.pt")), "the runs' checkpoints are dropped"
