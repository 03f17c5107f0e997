"""Start-up (issue 23 point 10): the mistakes a look at the files finds are reported before the heavy
imports (torch takes up to a minute on a busy machine), and a notice prints once per run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# runs one command through click's test runner in a fresh interpreter, then reports which heavy modules it imported
_PROBE = """
import json, sys
from click.testing import CliRunner
from cli.main import main
r = CliRunner().invoke(main, sys.argv[1:])
print(json.dumps({"code": r.exit_code, "output": r.output,
                  "heavy": sorted(m for m in ("torch", "polars", "nvidia.dali", "ray") if m in sys.modules)}))
"""


def _cli(*args) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def tok(tmp_path):
    p = tmp_path / "tok.model"
    p.write_bytes(b"x")
    return p


def test_train_refuses_a_missing_manifest_before_importing_torch(tmp_path, tok):
    r = _cli("train", "-m", tmp_path / "nothing", "-t", tok, "-o", tmp_path / "run")
    assert r["code"] == 1 and "_manifest.json not found" in r["output"] and r["heavy"] == [], r
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "_manifest.json").write_text("{}")
    r = _cli("train", "-m", tmp_path / "m", "-t", tok, "-o", tmp_path / "run", "--val-manifest", tmp_path)
    assert r["code"] == 1 and "--val-manifest" in r["output"] and r["heavy"] == [], r


@pytest.mark.parametrize("command", [["preview", "{m}", "-o", "{o}"], ["bench", "loader", "{m}"], ["stats", "{m}"],
                                     ["split", "{m}", "-o", "{o}"]], ids=lambda c: " ".join(c[:2]))
def test_manifest_commands_refuse_a_folder_without_a_manifest_before_heavy_imports(tmp_path, command):
    (tmp_path / "m").mkdir()   # exists (click's own check passes), holds no _manifest.json
    r = _cli(*[a.format(m=tmp_path / "m", o=tmp_path / "out") for a in command])
    assert r["code"] == 1 and "_manifest.json not found" in r["output"] and r["heavy"] == [], r


def test_train_refuses_an_existing_run_before_importing_torch(tmp_path, tok):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "_manifest.json").write_text("{}")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step_00000004.pt").write_bytes(b"x")
    r = _cli("train", "-m", tmp_path / "m", "-t", tok, "-o", tmp_path / "run")
    assert r["code"] == 1 and "already holds a run" in r["output"] and "--resume" in r["output"], r
    assert r["heavy"] == [], r


def test_embed_and_probe_refuse_bad_options_before_importing_torch(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    r = _cli("embed", image, "-c", image, "-o", tmp_path / "f.txt")
    assert r["code"] == 2 and "must end in .npy or .npz" in r["output"] and r["heavy"] == [], r
    r = _cli("probe", "-c", image, "--train", tmp_path, "--val", tmp_path, "--resolution", "224", "--native-res")
    assert r["code"] == 2 and "exclusive" in r["output"] and r["heavy"] == [], r


def test_shard_refuses_a_foreign_output_before_starting_ray(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not a manifest")
    (tmp_path / "in").mkdir()
    r = _cli("shard", tmp_path / "in", "-o", tmp_path / "out", "--distributor", "ray")
    assert r["code"] == 1 and "holds no manifest" in r["output"] and r["heavy"] == [], r
    r = _cli("shard", tmp_path / "nothing", "-o", tmp_path / "new", "--distributor", "ray")
    assert r["code"] == 1 and "no such file or folder" in r["output"] and r["heavy"] == [], r


@pytest.mark.slow
def test_the_mix_notice_prints_once_with_a_validation_set(tmp_path, capsys):
    """Training and validation loaders read the same mix: the notice that Table 2's HQITP is not in the
    manifest is printed once, not once per loader."""
    from _loader_fixtures import build_manifest
    from aimv2train.train.tokenizer import train_tokenizer
    from aimv2train.train.trainer import TrainConfig, train

    manifest = build_manifest(tmp_path / "data", n=48, sources=("dfn", "coyo"), synthetic=False)
    train_tokenizer(manifest, tmp_path / "tok.model", vocab_size=64, soft_limit=True)
    capsys.readouterr()
    train(TrainConfig(manifest=str(manifest), tokenizer=str(tmp_path / "tok.model"), out=str(tmp_path / "run"),
                      val_manifest=str(manifest), model="tiny", steps=1, resolution=28, batch_size=8, workers=0,
                      save_every=0, progress=False, peak_flops=1e11))
    err = capsys.readouterr().err
    assert len([line for line in err.splitlines() if "hqitp not in the manifest: dropped" in line]) == 1, err
