"""Careless input through the CLI (issue 12, items 14-15): one line on stderr, exit 1 (or click's usage
error, 2), no traceback, and nothing left behind."""
import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("faults_cli_data"))


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert isinstance(r.exception, SystemExit) or r.exception is None, f"traceback: {r.exception!r}\n{r.output}"
    assert "Traceback" not in r.output
    return r


def one_line_error(r, code=1):
    assert r.exit_code == code, r.output
    return " ".join(r.output.split())


def train_args(data, out, *extra):
    manifest, tok = data
    return ("train", "-m", manifest, "-t", tok, "--steps", 2, "--batch-size", 8, "--resolution", 56, "--workers", 0,
            "--no-progress", "-o", out, *extra)


@pytest.fixture(scope="module")
def moved(data):
    """The fixture manifest one folder deeper: its relative tar paths no longer resolve (tars 'moved')."""
    manifest, _ = data
    dst = manifest.parent / "deeper" / "manifest"
    if not dst.exists():
        shutil.copytree(manifest, dst)
    return dst


def test_train_on_a_manifest_whose_tars_moved(data, moved, tmp_path):
    r = run(*train_args((moved, data[1]), tmp_path / "run"))
    assert "none of the 1 tars of this share exists" in one_line_error(r)
    assert not (tmp_path / "run").exists()        # no run.json, no empty metrics.jsonl


def test_bench_loader_on_a_manifest_whose_tars_moved(moved):
    r = run("bench", "loader", moved, "--steps", 2, "--resolution", 56, "--batch-size", 8)
    assert "none of the 1 tars of this share exists" in one_line_error(r)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_device_cuda_without_a_gpu(data, tmp_path):
    r = run(*train_args(data, tmp_path / "run", "--device", "cuda"))
    assert "torch sees no CUDA device" in one_line_error(r)
    assert not (tmp_path / "run").exists()


def test_tokenizer_negative_vocab_size(data, tmp_path):
    r = run("tokenizer", "train", data[0], "-o", tmp_path / "t.model", "--vocab-size", -5)
    assert "--vocab-size must be at least 4" in one_line_error(r)


def test_caption_generate_with_a_folder_that_is_not_a_captioner(data, tmp_path):
    manifest, _ = data
    notamodel = tmp_path / "notamodel"
    notamodel.mkdir()
    (notamodel / "readme.txt").write_text("hello")
    before = sorted(p.name for p in manifest.rglob("*"))
    r = run("caption", "generate", manifest, "--model", notamodel)
    assert "is not an image-to-text captioner" in one_line_error(r)
    assert sorted(p.name for p in manifest.rglob("*")) == before     # no empty .parts folder


@pytest.mark.parametrize("extra, says", [
    (("--resolution", 0), "--resolution must be positive"),
    (("--workers", -1), "--workers must be >= 0"),
    (("--native-res", "--stage", "pretrain"), "--resolution has no effect with --native-res"),
    (("--warn-replaced", 5), "--warn-replaced is a share"),
])
def test_train_invalid_values_are_refused_before_anything_is_written(data, tmp_path, extra, says):
    r = run(*train_args(data, tmp_path / "run", *extra))
    assert says in one_line_error(r)
    assert not (tmp_path / "run").exists()


def test_bench_loader_negative_steps(data):
    r = run("bench", "loader", data[0], "--steps", -1)
    assert "--steps" in one_line_error(r, code=2)


def test_embed_refuses_a_bad_output_before_embedding(data, tmp_path):
    r = run("embed", data[0], "-c", data[0], "-o", tmp_path / "x.txt")
    assert "must end in .npy or .npz" in one_line_error(r, code=2)


def test_embed_max_patches_zero(data, tmp_path):
    r = run("embed", data[0], "-c", data[0], "-o", tmp_path / "x.npy", "--max-patches", 0)
    assert "--max-patches" in one_line_error(r, code=2)


def test_shard_refuses_an_unrelated_non_empty_output(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import _shard_fixtures as F

    (tmp_path / "shards").mkdir()
    F.good_tar(tmp_path / "shards" / "00000.tar", 2)
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    r = run("shard", tmp_path / "shards", "-o", home)
    assert "non-empty folder that holds no manifest" in one_line_error(r)
    assert sorted(p.name for p in home.iterdir()) == ["thesis.tex"]


def test_fetch_and_shard_share_one_max_pixels_default():
    from aimv2data.fetch import DEFAULT_MAX_PIXELS as fetch_default
    from aimv2data.manifest.inspect_image import DEFAULT_MAX_PIXELS as shard_default
    from cli.fetch import fetch
    from cli.shard import shard

    defaults = [p.default for c in (fetch, shard) for p in c.params if p.name == "max_pixels"]
    assert defaults == [fetch_default, shard_default] and fetch_default == shard_default


def test_embed_a_lone_non_image_says_why(tmp_path):
    from aimv2train.model.config import model_config
    from aimv2train.model.encoder import Encoder
    from aimv2train.model.interop import save_encoder

    ckpt = save_encoder(Encoder(model_config("tiny").encoder), tmp_path / "enc.pt")
    (tmp_path / "photo.jpg").write_text("<html>404</html>")
    r = run("embed", tmp_path / "photo.jpg", "-c", ckpt, "-o", tmp_path / "x.npy")
    msg = one_line_error(r)
    assert "no image could be embedded" in msg and "photo.jpg:" in msg
