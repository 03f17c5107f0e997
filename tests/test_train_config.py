"""One definition per training flag: `aimv2 train`'s options come from TrainConfig's fields (issue 11)."""
import dataclasses

from click.testing import CliRunner

from aimv2data.loader.decoders import DECODERS
from aimv2train.train.config import PARALLEL_MODES, STAGE_NAMES, TrainConfig
from cli.main import main


def test_every_field_is_a_flag_with_the_dataclass_default(tmp_path, monkeypatch):
    """The CLI with only the required flags builds exactly TrainConfig's defaults; every field but the
    test-only peak_flops has a flag with help in `--help`."""
    from aimv2train.train import trainer

    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        raise trainer.TrainError("stop here")

    monkeypatch.setattr(trainer, "train", fake_train)
    man, tok = tmp_path / "m", tmp_path / "tok.model"
    man.mkdir()
    (man / "_manifest.json").write_text("{}")   # a manifest to the CLI's look before the (faked) trainer
    tok.write_bytes(b"x")
    r = CliRunner().invoke(main, ["train", "-m", str(man), "-t", str(tok), "-o", str(tmp_path / "run")])
    assert "stop here" in r.output, r.output
    assert seen["cfg"] == TrainConfig(manifest=str(man), tokenizer=str(tok), out=str(tmp_path / "run"))

    r = CliRunner().invoke(main, ["train", "-m", str(man), "-t", str(tok), "-o", str(tmp_path / "run"), "--no-progress",
                                  "--compile", "--lr", "3e-4", "--stage", "highres", "--decoder", "dali"])
    cfg = seen["cfg"]
    assert (cfg.progress, cfg.compile, cfg.lr, cfg.stage) == (False, True, 3e-4, "highres")
    assert cfg.image_decoder == "dali"  # --decoder, the older name of --image-decoder, still works
    assert "aimv2 train: --decoder is deprecated, use --image-decoder" in r.stderr

    help_text = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    for f in dataclasses.fields(TrainConfig):
        name = f.metadata.get("name", "--" + f.name.replace("_", "-"))
        if f.metadata.get("cli", True):
            assert name in help_text and f.metadata["help"], f.name
        else:
            assert name not in help_text


def test_choices_match_what_they_name():
    from aimv2data.loader.decode_dali import DaliDecoder
    from aimv2data.loader.decode_pil import PilDecoder
    from aimv2train.train.distributed import PARALLEL_MODES as modes
    from aimv2train.train.presets import STAGES

    assert tuple(STAGES) == STAGE_NAMES
    assert modes == PARALLEL_MODES
    assert set(DECODERS) == {PilDecoder.name, DaliDecoder.name}


def test_dist_timeout_reaches_the_process_group(tmp_path, monkeypatch):
    """--dist-timeout (minutes, default 60) is the process group's timeout: NCCL's own 10 minutes is less than
    the other ranks may wait in a barrier while rank 0 writes a large checkpoint."""
    import datetime
    from types import SimpleNamespace

    import pytest
    import torch.distributed as dist

    from aimv2train.train import trainer

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("joined")

    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(trainer, "make_plan", lambda *a, **k: SimpleNamespace(fits=True))  # the plan reads the tokenizer
    base = dict(manifest=str(tmp_path), tokenizer=str(tmp_path / "tok.model"), out=str(tmp_path / "run"), device="cpu")
    for cfg, minutes in ((TrainConfig(**base), 60), (TrainConfig(**base, dist_timeout=180), 180)):
        with pytest.raises(RuntimeError, match="joined"):
            trainer.train(cfg)
        assert seen["timeout"] == datetime.timedelta(minutes=minutes)
    with pytest.raises(trainer.TrainError, match="--dist-timeout"):
        trainer.train(TrainConfig(**base, dist_timeout=0))
