"""`aimv2 train --config FILE`: options from TOML (or a run's run.json), command line wins, unknown keys
are a one-line error with the nearest key; the shipped configs/ are valid and follow the presets."""
import json
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from aimv2train.train.presets import PAPER  # noqa: E402
from cli.config_file import config_file_option, resolve_config, tomllib  # noqa: E402
from cli.main import main  # noqa: E402
from cli.train import train as train_cmd  # noqa: E402

torch.set_num_threads(1)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@click.command()
@config_file_option(section="train")
@click.option("--steps", default=10, type=int)
@click.option("--batch-size", default=4, type=int)
@click.option("--compile", "compile_", is_flag=True)
@click.option("--no-progress", is_flag=True)
@click.option("--shuffle/--no-shuffle", default=True)
def toy(**kw):
    click.echo(json.dumps(kw, sort_keys=True))


def run_toy(tmp_path, text, *args, name="c.toml"):
    (tmp_path / name).write_text(text)
    return CliRunner().invoke(toy, ["--config", str(tmp_path / name), *args])


def test_file_values_flags_override_and_spellings(tmp_path):
    r = run_toy(tmp_path, 'steps = 7\n"batch-size" = 9\ncompile = true\nprogress = false\nno_shuffle = true\n')
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == {"steps": 7, "batch_size": 9, "compile_": True, "no_progress": True,
                                    "shuffle": False}
    r = run_toy(tmp_path, "steps = 7\nbatch_size = 9\n", "--steps", "3")
    assert json.loads(r.output)["steps"] == 3 and json.loads(r.output)["batch_size"] == 9
    r = run_toy(tmp_path, "[train]\nsteps = 5\n")  # keys may sit under the section's table
    assert json.loads(r.output)["steps"] == 5
    r = run_toy(tmp_path, json.dumps({"train": {"steps": 6, "progress": True, "batch_size": None},
                                      "hparams": {"peak_lr": 1}}), name="run.json")
    assert json.loads(r.output) == {"steps": 6, "batch_size": 4, "compile_": False, "no_progress": False,
                                    "shuffle": True}


def test_unknown_key_is_one_line_naming_the_nearest(tmp_path):
    r = run_toy(tmp_path, "batchsize = 9\n")
    assert r.exit_code == 2
    line = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert len(line) == 1 and "unknown key 'batchsize'; did you mean 'batch_size'?" in line[0]
    r = run_toy(tmp_path, "steps = \n")
    assert r.exit_code == 2 and "is not valid TOML" in r.output


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_configs_are_valid_and_follow_the_presets(path):
    values = tomllib.loads(path.read_text())
    resolved = resolve_config(train_cmd, values, source=str(path))  # no unknown key
    assert set(resolved) == set(values)
    if path.parent != CONFIGS:  # per size: Table A1's rate, stage rules
        size = path.parent.name
        assert values["model"] == size and values["lr"] == PAPER[size].peak_lr
        stage = path.stem.split("-")[0]
        assert values["stage"] == stage
        if stage == "highres":
            assert values["weight_decay"] == 0 and values["resolution"] == int(path.stem.split("-")[1])
        if stage == "pretrain":
            assert values["steps"] == 1_500_000 and values["batch_size"] * 32 == 8192


def test_demo_config_trains_and_run_json_repeats_the_run(tmp_path_factory, tmp_path):
    manifest, tok = _train_fixtures.build(tmp_path_factory.mktemp("cfg_data"))
    common = ["-m", str(manifest), "-t", str(tok), "--steps", "2", "--resolution", "56", "--batch-size", "8",
              "--workers", "0", "--peak-flops", "1e11", "--no-progress"]
    r = CliRunner().invoke(main, ["train", "--config", str(CONFIGS / "demo.toml"), *common, "-o", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "throughput" in r.output and "MFU" in r.output  # the summary table
    first = json.loads((tmp_path / "a/run.json").read_text())["train"]
    assert first["steps"] == 2 and first["resolution"] == 56  # the command line won
    assert first["save_every"] == 100 and first["val_every"] == 50 and first["report_to"] == "tensorboard"  # the file
    assert any((tmp_path / "a/tensorboard").iterdir())
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "a/run.json"), "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "b/run.json").read_text())["train"]
    assert {**again, "out": None} == {**first, "out": None}
    loss = lambda run: [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert loss(tmp_path / "b") == loss(tmp_path / "a")


@pytest.mark.parametrize("text,needle", [("steps = 5.7\n", "steps must be a whole number, got 5.7"),
                                         ("steps = [7]\n", "steps must be a single value, got [7]"),
                                         ('steps = "7"\n', "steps must be a whole number"),
                                         ("compile = 1\n", "compile must be true or false, got 1")])
def test_a_value_of_the_wrong_kind_is_one_line_naming_the_key(tmp_path, text, needle):
    r = run_toy(tmp_path, text)
    assert r.exit_code == 2, r.output                      # 5.7 used to run with steps = 5
    line = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
    assert len(line) == 1 and needle in line[0], r.output


def test_train_config_wrong_types_and_non_utf8_are_one_line(tmp_path):
    cfg = tmp_path / "t.toml"
    for text, needle in ((b"resolution = [56]\n", "resolution must be a single value"),
                         (b"steps = 5.7\n", "steps must be a whole number"),
                         (b"# caf\xe9\nsteps = 5\n", "is not UTF-8 text")):
        cfg.write_bytes(text)
        r = CliRunner().invoke(main, ["train", "--config", str(cfg), "-m", "m", "-t", str(cfg), "-o",
                                      str(tmp_path / "run")])
        assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
        line = [ln for ln in r.output.splitlines() if ln.startswith("Error")]
        assert len(line) == 1 and needle in line[0], r.output
