"""Noise a new user meets (issue 12, item 20): install banners, help texts that talk about our issues or
promise what they do not say."""
import warnings

from click.testing import CliRunner

from cli.main import main


def test_pyproject_metadata_has_no_deprecation_banner():
    """setuptools warned (3x per install) about the `license = {text = ...}` table; an SPDX string is clean."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    from pathlib import Path

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_configuration(Distribution(), Path(__file__).resolve().parents[1] / "pyproject.toml")


def test_help_texts_speak_to_users():
    bench = CliRunner().invoke(main, ["bench", "loader", "--help"]).output
    demo = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "issue" not in bench
    assert "a few minutes" not in demo and "70 s" in " ".join(demo.split())


def test_model_card_says_how_to_preprocess(tmp_path):
    """Item 18: a native-resolution export needs a direct bicubic resize to (h*p, w*p) (a crop differs),
    and EXIF orientation is applied by `embed` but not by transformers: the card says both."""
    import torch

    from aimv2train.eval.export import export
    from aimv2train.model.config import model_config
    from aimv2train.model.encoder import Encoder
    from aimv2train.model.interop import save_encoder

    for pos, name in (("sincos", "native"), ("learned", "fixed")):
        torch.manual_seed(0)
        ckpt = save_encoder(Encoder(model_config("tiny", pos_embed=pos).encoder), tmp_path / f"{name}.pt")
        export(ckpt, "hf", tmp_path / name)
        card = " ".join((tmp_path / name / "README.md").read_text().split())
        assert "## Preprocessing" in card and "exif_transpose" in card
        if name == "native":
            assert "directly, bicubic, to (h*14, w*14) pixels" in card and "without cropping" in card
            assert not (tmp_path / name / "preprocessor_config.json").exists()
        else:
            assert "centre crop" in card and (tmp_path / name / "preprocessor_config.json").is_file()


def test_fetch_progress_has_a_total():
    """Item 17: img2dataset's shard bar had no total, so no share done and no ETA."""
    import img2dataset.distributor as dist

    from aimv2data.fetch.download import _shard_progress

    with _shard_progress(7):
        bar = dist.tqdm(iter(()), disable=True)
        assert bar.total == 7
    assert dist.tqdm(iter(()), disable=True).total is None   # given back
