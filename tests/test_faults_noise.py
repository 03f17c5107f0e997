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
