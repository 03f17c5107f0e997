"""Synthetic caption sets: attach joins them on every matched row (several per sample allowed) and
reports what matched; generate runs a local image-to-text model and writes a set attach takes."""
import hashlib
import json
import os
import sys

import polars as pl
import pytest
from click.testing import CliRunner

from aimv2data.manifest.build import build_manifest
from aimv2data.manifest.captions import CaptionError, attach, generate

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402


@pytest.fixture()
def manifest(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    F.good_tar(shards / "00000.tar", 6, start=0, seed=1)
    F.good_tar(shards / "00001.tar", 6, start=6, seed=2)
    out = tmp_path / "m"
    build_manifest([str(shards)], out, progress=False, idx="none")
    return out


def samples(m):
    return pl.read_parquet(m / "samples/*.parquet").sort("key")


def test_attach_parquet_by_uid_with_several_captions_per_sample(manifest, tmp_path):
    # uids g0..g11 exist; g0 gets two rows + a duplicate, g1 one, g99 matches nothing, g2 only blanks.
    pl.DataFrame({"uid": ["g0", "g0", "g0", "g1", "g99", "g2"],
                  "re_caption": ["a red car", "a car, red", "a red car", "a dog", "nobody", "  "]}
                 ).write_parquet(tmp_path / "set.parquet")
    r = attach(manifest, tmp_path / "set.parquet", on="uid", column="re_caption", name="recap")
    assert (r["matched_rows"], r["unmatched_rows"], r["captions"], r["unused_keys"]) == (2, 10, 3, 1)
    s = samples(manifest)
    syn = dict(zip(s["uid"], s["syn_recap"].to_list()))
    assert syn["g0"] == ["a red car", "a car, red"] and syn["g1"] == ["a dog"]
    assert all(syn[f"g{i}"] is None for i in range(2, 12))
    meta = json.loads((manifest / "_manifest.json").read_text())
    assert meta["caption_sets"]["recap"]["column"] == "syn_recap"
    assert meta["caption_sets"]["recap"]["matched_rows"] == 2
    # Re-attaching the same name replaces the column, it does not add a second one.
    pl.DataFrame({"uid": ["g3"], "re_caption": ["a tree"]}).write_parquet(tmp_path / "set2.parquet")
    attach(manifest, tmp_path / "set2.parquet", on="uid", column="re_caption", name="recap")
    s = samples(manifest)
    assert [c for c in s.columns if c.startswith("syn_")] == ["syn_recap"]
    assert s.filter(pl.col("syn_recap").is_not_null())["uid"].to_list() == ["g3"]


def test_attach_jsonl_list_column_by_url_and_by_sha256(manifest, tmp_path):
    s = samples(manifest)
    urls = s["url"].to_list()
    with open(tmp_path / "set.jsonl", "w") as f:
        for u in urls[:5]:
            f.write(json.dumps({"url": u, "caps": [f"first {u}", f"second {u}"]}) + "\n")
    r = attach(manifest, tmp_path / "set.jsonl", on="url", column="caps", name="dr")
    assert (r["matched_rows"], r["captions"]) == (5, 10)
    got = samples(manifest)
    for u, caps in zip(got["url"], got["syn_dr"].to_list()):
        assert caps == ([f"first {u}", f"second {u}"] if u in urls[:5] else None)
    # sha256: the good tars' json has none, so the manifest hashed the stored bytes; a set keyed by the
    # hash of the image bytes matches every row.
    hashes = []
    for shard, off, size in got.select("shard", "offset", "size").iter_rows():
        with open(manifest / shard, "rb") as fh:
            fh.seek(off)
            hashes.append(hashlib.sha256(fh.read(size)).hexdigest())
    pl.DataFrame({"hash": hashes, "text": ["x"] * len(hashes)}).write_parquet(tmp_path / "h.parquet")
    r = attach(manifest, tmp_path / "h.parquet", on="sha256", column="text", key_column="hash", name="h")
    assert r["matched_rows"] == 12 and r["unmatched_rows"] == 0


def test_attach_errors_say_what_to_do(manifest, tmp_path):
    pl.DataFrame({"uid": ["g0"], "txt": ["a"]}).write_parquet(tmp_path / "s.parquet")
    with pytest.raises(CaptionError, match=r"no column\(s\) \['re_caption'\]; it has \['uid', 'txt'\]"):
        attach(manifest, tmp_path / "s.parquet", on="uid", column="re_caption")
    with pytest.raises(CaptionError, match="--name"):
        attach(manifest, tmp_path / "s.parquet", on="uid", column="txt", name="Bad Name")
    with pytest.raises(CaptionError, match="aimv2 shard"):
        attach(tmp_path, tmp_path / "s.parquet", on="uid", column="txt")


def test_new_tars_after_attach_get_the_column_as_null(manifest, tmp_path):
    pl.DataFrame({"uid": ["g0"], "c": ["zero"]}).write_parquet(tmp_path / "s.parquet")
    attach(manifest, tmp_path / "s.parquet", on="uid", column="c", name="late")
    F.good_tar(tmp_path / "shards/00002.tar", 3, start=12, seed=3)
    build_manifest([str(tmp_path / "shards")], manifest, progress=False, idx="none")
    s = samples(manifest)                          # one glob reads all parts: same schema everywhere
    assert s.height == 15 and s["syn_late"].null_count() == 14
    meta = json.loads((manifest / "_manifest.json").read_text())
    assert meta["caption_sets_incomplete"] == {"late": 1} and "late" in meta["caption_sets"]


def test_cli_attach_reports_counts(manifest, tmp_path):
    from cli.main import main

    pl.DataFrame({"uid": ["g0", "g5", "nope"], "c": ["a", "b", "c"]}).write_parquet(tmp_path / "s.parquet")
    res = CliRunner().invoke(main, ["caption", "attach", str(manifest), "--captions", str(tmp_path / "s.parquet"),
                                    "--on", "uid", "--column", "c", "--name", "cli"])
    assert res.exit_code == 0, res.output
    assert "2 of 12 samples matched on uid (16.7%), 10 unmatched" in res.output
    assert "1 of 3 caption-set keys matched no sample" in res.output


def tiny_captioner(path):
    """A randomly initialised ViT encoder + GPT-2 decoder, a ViT image processor and a WordLevel tokenizer,
    saved like any HF model: built from configs, nothing downloaded."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, PreTrainedTokenizerFast, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor)

    torch.manual_seed(0)
    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w in "a photo of the cat dog red blue car tree house".split():
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                  unk_token="[UNK]")
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    dec = GPT2Config(vocab_size=len(vocab), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 1, 0, 2
    model = VisionEncoderDecoderModel(config=cfg)
    g = model.generation_config
    g.decoder_start_token_id, g.pad_token_id, g.eos_token_id = 1, 0, 2
    g.min_new_tokens, g.suppress_tokens = 3, [0, 1, 2, 3]    # random weights: force real words out
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    tok.save_pretrained(path)
    return set(vocab) - {"[PAD]", "[BOS]", "[EOS]", "[UNK]"}


def test_generate_with_a_local_model_then_attach(manifest, tmp_path):
    import torch

    torch.set_num_threads(1)
    words = tiny_captioner(tmp_path / "tinycap")
    out = tmp_path / "caps.parquet"
    r = generate(manifest, str(tmp_path / "tinycap"), output=out, batch_size=5, max_new_tokens=6, progress=False)
    assert r["captioned"] == 12 and r["failed"] == 0 and r["device"] == "cpu"
    caps = pl.read_parquet(out)
    assert caps.columns == ["key", "uid", "url", "sha256", "caption", "model"]
    assert caps.height == 12 and set(caps["model"]) == {"tinycap"}
    for c in caps["caption"]:
        assert 3 <= len(c.split()) <= 6 and set(c.split()) <= words
    assert not (tmp_path / "caps.parquet.parts").exists()
    a = attach(manifest, out, on="sha256", column="caption", name="tiny")
    assert a["matched_rows"] == 12
    s = samples(manifest)
    assert all(isinstance(v, list) and len(v) == 1 for v in s["syn_tiny"].to_list())


def test_generate_resumes_from_finished_parts(manifest, tmp_path):
    import torch

    torch.set_num_threads(1)
    tiny_captioner(tmp_path / "tinycap")
    out = tmp_path / "caps.jsonl"
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    first = sorted((manifest / "samples").glob("*.parquet"))[0]
    done = pl.read_parquet(first).select("key", "uid", "url", "sha256").with_columns(
        pl.lit("kept from before").alias("caption"), pl.lit("tinycap").alias("model"))
    done.write_parquet(parts / first.name)         # as if a previous run had finished this part
    r = generate(manifest, str(tmp_path / "tinycap"), output=out, max_new_tokens=4, progress=False)
    caps = pl.read_ndjson(out)
    assert r["captioned"] == 12 and caps.height == 12
    assert (caps["caption"] == "kept from before").sum() == 6


def test_interrupted_attach_resumes_with_the_parts_left(manifest, tmp_path, monkeypatch):
    import aimv2data.manifest.captions as C

    pl.DataFrame({"uid": [f"g{i}" for i in range(12)], "re_caption": [f"cap {i}" for i in range(12)]}
                 ).write_parquet(tmp_path / "set.parquet")
    real, written = C.write_parquet_atomic, []

    def dies_after_one(table, path):
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real(table, path)

    monkeypatch.setattr(C, "write_parquet_atomic", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        attach(manifest, tmp_path / "set.parquet", on="uid", column="re_caption", name="recap")
    assert "recap" not in json.loads((manifest / "_manifest.json").read_text()).get("caption_sets", {})
    assert len(list((manifest / "_captions" / "recap").glob("*.done"))) == 1      # one part done and marked

    monkeypatch.setattr(C, "write_parquet_atomic", lambda t, p: (written.append(p), real(t, p)))
    r = attach(manifest, tmp_path / "set.parquet", on="uid", column="re_caption", name="recap")
    assert len(written) == 2 and written[0] != written[1]                          # the second part only
    assert r["matched_rows"] == 12 and not (manifest / "_captions").exists()
    s = samples(manifest)
    assert dict(zip(s["uid"], s["syn_recap"].to_list())) == {f"g{i}": [f"cap {i}"] for i in range(12)}


def test_attach_drops_captions_above_the_size_limit_and_counts_them(manifest, tmp_path):
    from cli.main import main

    pl.DataFrame({"uid": ["g0", "g0", "g1"], "c": ["short", "x" * 70_000, "y" * 70_000]}
                 ).write_parquet(tmp_path / "s.parquet")
    r = attach(manifest, tmp_path / "s.parquet", on="uid", column="c", name="big")
    assert (r["matched_rows"], r["captions"], r["captions_too_large"]) == (1, 1, 2)
    assert dict(zip(samples(manifest)["uid"], samples(manifest)["syn_big"].to_list()))["g0"] == ["short"]
    res = CliRunner().invoke(main, ["caption", "attach", str(manifest), "--captions", str(tmp_path / "s.parquet"),
                                    "--on", "uid", "--column", "c", "--name", "big2", "--max-caption-bytes", "3"])
    assert res.exit_code == 0, res.output
    assert "3 captions above --max-caption-bytes dropped" in res.output


def test_shard_help_documents_the_member_size_limits():
    from cli.main import main

    out = CliRunner().invoke(main, ["shard", "--help"], terminal_width=200).output
    for flag in ("--max-caption-bytes", "--max-json-bytes", "--max-image-bytes"):
        assert flag in out
