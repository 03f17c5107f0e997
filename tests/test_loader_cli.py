"""`aimv2 bench loader`: the JSON summary and the per-step log a user scripts against."""
import json

import click
import pytest
import torch
from click.testing import CliRunner

from _loader_fixtures import build_manifest
from cli.main import main

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return build_manifest(tmp_path_factory.mktemp("bench"), n=300, seed=5, patch_size=4,
                          aspects=[0.5, 1.0, 2.0], corrupt=(11,))


def _run(args):
    res = CliRunner().invoke(main, ["bench", "loader", *args])
    assert res.exit_code == 0, res.output
    return res


def test_native_bench_json_and_steps_log(manifest, tmp_path):
    log = tmp_path / "steps.jsonl"
    res = _run([str(manifest), "--native-res", "--batch-patches", "4096", "--image-decoder", "pil", "--workers", "0",
                "--steps", "12", "--warmup", "1", "--steps-log", str(log), "--json"])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["steps"] == 12 and r["batch_patches"] == 4096 and r["mode"] == "native"
    assert r["images_per_s"] > 0 and r["patches_per_s"] > r["images_per_s"]
    assert r["padding"] == 0.0 and 0.95 <= r["budget_use"] <= 1.0
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(lines) == 13                                     # warm-up step logged too, marked untimed
    assert [x["timed"] for x in lines].count(False) == 1
    for x in lines:
        assert x["batch_size"] * x["area"] == 4096 and x["grid_h"] * x["grid_w"] <= x["area"]
        assert x["padding"] == 0.0
    timed = [x for x in lines if x["timed"]]
    assert r["patches"] == sum(x["batch_size"] * x["grid_h"] * x["grid_w"] for x in timed)
    assert r["budget_use"] == pytest.approx(r["patches"] / (12 * 4096), abs=1e-6)
    assert r["images"] == sum(x["batch_size"] for x in timed)


def test_fixed_bench_runs_past_the_end_of_an_epoch_with_dali(manifest):
    # 300 samples / 64 = 4 steps an epoch: 10 steps need 3 epochs
    res = _run([str(manifest), "--resolution", "32", "--batch-size", "64", "--image-decoder", "dali", "--steps", "10",
                "--json"])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["steps"] == 10 and r["images"] == 640 and r["budget_use"] == 1.0 and r["device"] == "cpu"


def test_bad_options_are_clear_errors(manifest):
    res = CliRunner().invoke(main, ["bench", "loader", str(manifest), "--native-res", "--batch-patches", "5000"])
    assert res.exit_code != 0 and "power of two" in res.output
    res = CliRunner().invoke(main, ["bench", "loader", str(manifest), "--resolution", "30"])
    assert res.exit_code != 0 and "multiple of the patch size" in res.output
    res = CliRunner().invoke(main, ["bench", "loader", "--help"])
    assert res.exit_code == 0 and "--steps-log" in res.output and "--batch-patches" in res.output


def test_bench_mix_and_per_source_counts_in_the_steps_log(tmp_path):
    m = build_manifest(tmp_path, n=240, seed=6, patch_size=4, aspects=[1.0], sources=("dfn", "coyo"),
                       parts=4, by_source=True, synthetic=False)
    log = tmp_path / "steps.jsonl"
    res = _run([str(m), "--native-res", "--batch-patches", "4096", "--steps", "30", "--warmup", "0",
                "--mix", "dfn=0.25,coyo=0.75", "--steps-log", str(log), "--json"])
    r = json.loads(res.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert all(sum(x["sources"].values()) == x["batch_size"] and len(x["sources"]) == 1 for x in lines)
    assert r["sources"] == {k: sum(x["sources"].get(k, 0) for x in lines) for k in ("coyo", "dfn")}
    assert r["mix"] == {"coyo": 0.75, "dfn": 0.25}
    assert abs(r["sources"]["coyo"] / r["images"] - 0.75) < 0.05
    bad = CliRunner().invoke(main, ["bench", "loader", str(m), "--native-res", "--batch-patches", "4096",
                                    "--mix", "dfn=1,laion=2"])
    assert bad.exit_code != 0 and "source 'laion'" in bad.output and "Traceback" not in bad.output


# ------------------------------------------------------------------ the decoder registry (issue 23 point 3)

def _choices(command, name):
    (param,) = [p for p in command.params if p.name == name]
    return list(param.type.choices)


def test_every_decoder_option_offers_the_registry():
    """`aimv2 train --image-decoder`, `bench loader --decoder` and `preview --decoder` offer the registry's
    decoders, and say what `--workers` means for each."""
    from aimv2data.loader.decoders import DECODERS
    from cli.bench import loader as bench_loader
    from cli.preview import preview
    from cli.train import train

    for command, name in ((train, "image_decoder"), (bench_loader, "decoder"), (preview, "decoder")):
        assert _choices(command, name) == list(DECODERS), command.name
    res = CliRunner().invoke(main, ["bench", "loader", "--help"])
    assert "processes (0 = decode in this process)" in " ".join(res.output.split())


class _Grey:
    """A decoder of mid-grey images: what a third decoder needs to give the loader."""
    name = "grey"

    def decode_batch(self, datas, crops, orientations=None):
        from aimv2data.batch import empty_images

        w, h = crops[0].out
        images = empty_images(len(datas), h, w)
        images.fill_(128)
        return images, {}

    def close(self):
        pass


def test_a_decoder_added_to_the_registry_is_selectable(manifest, monkeypatch):
    """One entry in decoders.DECODERS: the loader builds it and the generated options offer it."""
    from aimv2data.loader import Loader
    from aimv2data.loader.decoders import DECODERS, PROCESSES, DecoderSpec
    from aimv2train.train.config import TrainConfig
    from cli.options import decoder_option
    from cli.train import config_options

    monkeypatch.setitem(DECODERS, "grey", DecoderSpec("mid-grey, for tests", PROCESSES, 0, False,
                                                      lambda maker: _Grey()))
    batch = next(iter(Loader(str(manifest), resolution=32, batch_size=8, decoder="grey", workers=0)))
    assert batch.images.shape == (8, 3, 32, 32) and bool((batch.images == 128).all())

    @click.command()
    @decoder_option("--decoder")
    def bench(decoder):
        click.echo(decoder)

    @click.command()
    @config_options(TrainConfig)
    def train(**settings):
        click.echo(settings["image_decoder"])

    assert CliRunner().invoke(bench, ["--decoder", "grey"]).output.strip() == "grey"
    res = CliRunner().invoke(train, ["--image-decoder", "grey"])
    assert res.exit_code == 0 and res.output.strip() == "grey", res.output
    with pytest.raises(ValueError, match="unknown decoder 'gray': use pil or dali or grey"):
        Loader(str(manifest), resolution=32, batch_size=8, decoder="gray")
