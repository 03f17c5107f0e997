"""docs/contracts.md: 2 is a malformed command line (click's usage code), 1 an input the command refuses
after looking at it, whichever command it is."""
import pytest
from click.testing import CliRunner

from cli.main import main


def _code(args):
    return CliRunner().invoke(main, [str(a) for a in args]).exit_code


@pytest.mark.parametrize("args", [
    ["shard", "--no-such-flag"],
    ["stats"],                                               # missing argument
    ["shard", "x.tar", "--output", "m", "--workers", "many"],  # not a number
    ["embed", "a.jpg", "--checkpoint", "c", "--output", "o.npy", "--resolution", "224", "--native-res"],
])
def test_a_malformed_command_line_exits_2(args):
    assert _code(args) == 2


def test_refused_inputs_exit_1(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    urls = tmp_path / "u.parquet"
    urls.write_bytes(b"not parquet")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    # fetch used to exit 2 for each of these: a folder holding something else, a file as output, a bad url list
    assert _code(["fetch", "--source", "coyo", "--url-list", urls, "--output", photos]) == 1
    assert _code(["fetch", "--source", "coyo", "--url-list", urls, "--output", a_file]) == 1
    assert _code(["fetch", "--source", "coyo", "--url-list", urls, "--output", tmp_path / "new"]) == 1
    assert _code(["shard", str(a_file), "--output", tmp_path / "m2", "--max-aspect", "0.5"]) == 1
