import json

from click.testing import CliRunner

from cli.main import main


def test_doctor_reports_the_live_pil_and_dali():
    res = CliRunner().invoke(main, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    import PIL

    assert r["pil"]["version"] == PIL.__version__
    # The live distribution is the one whose version matches the imported PIL.
    import importlib.metadata as md

    assert md.version(r["pil"]["distribution"]) == PIL.__version__
    assert r["pil"]["simd"] == (r["pil"]["distribution"].lower() == "pillow-simd")
    from aimv2data.loader import decode_turbo

    assert r["jpeg"]["crop_window"] == (decode_turbo._jpegcrop is not None)
    assert r["dali"]["available"] in (True, False)
    assert r["torch"]["available"] is True


def test_every_command_has_help():
    from cli.main import COMMANDS

    for name in COMMANDS:
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "Usage:" in res.output
