"""`aimv2 tokenizer train` and the Tokenizer callable the loader and the text decoder rely on."""
import pickle
import random

import polars as pl
import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner

from aimv2train.train.tokenizer import EOS_ID, MAX_TEXT_LEN, PAD_ID, UNK_ID, Tokenizer, train_tokenizer

WORDS = ("a photo of the dog cat red blue car tree house man woman on in with small large green sky beach "
         "street bird flower boat river mountain city night people child table chair window yellow white "
         "black orange purple brown running sitting standing flying old young wooden glass metal").split()


def make_manifest(root, n=400, seed=0):
    """samples/*.parquet in two files with an alt-text column and a synthetic list[str] column; the word
    'xylophonist' occurs only in the synthetic column, 'quokka' only in the alt-text."""
    rng = random.Random(seed)
    (root / "samples").mkdir(parents=True)
    for part in range(2):
        caps = [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + " quokka" for _ in range(n // 2)]
        caps[0], caps[1] = None, ""
        syn = [[" ".join(rng.choices(WORDS, k=8)) + " xylophonist", "a xylophonist"] for _ in range(n // 2)]
        syn[2] = None
        pl.DataFrame({"key": [f"{part}{i:04d}" for i in range(n // 2)], "caption": caps,
                      "syn_fake": syn}).write_parquet(root / "samples" / f"{part:05d}.parquet")
    return root


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    root = make_manifest(tmp_path_factory.mktemp("m"))
    out = root / "tok.model"
    report = train_tokenizer(root, out, vocab_size=60)
    assert report.columns == {"caption": 396, "syn_fake": 2 * 398}  # nulls and "" skipped, lists exploded
    return out


def test_reserved_ids_and_vocab(tok_path):
    tok = Tokenizer(tok_path)
    assert (tok.pad_id, tok.eos_id, tok.sp.unk_id(), tok.sp.bos_id()) == (PAD_ID, EOS_ID, UNK_ID, -1)
    assert tok.vocab_size == 60
    assert tok.sp.id_to_piece(0) == "<pad>" and tok.sp.id_to_piece(1) == "</s>"


def test_learns_from_every_caption_column(tok_path):
    tok = Tokenizer(tok_path)
    for word in ("quokka", "xylophonist"):  # alt-text only / synthetic only: both known, no <unk>
        ids = tok.ids(word)
        assert UNK_ID not in ids and tok.sp.decode(ids[:-1]) == word
    assert UNK_ID in tok.ids("\u4e2d")  # a character never seen


def test_encode_pads_appends_eos_and_cuts_at_77(tok_path):
    tok = Tokenizer(tok_path)
    long = " ".join(["quokka xylophonist"] * 80)
    x = tok(["a photo of a dog", "", None, long])
    assert x.dtype == torch.long and x.shape == (4, MAX_TEXT_LEN)
    ids = tok.sp.encode("a photo of a dog")
    assert x[0, :len(ids)].tolist() == ids and x[0, len(ids)] == EOS_ID
    assert (x[0, len(ids) + 1:] == PAD_ID).all()
    assert x[1, 0] == EOS_ID and x[2, 0] == EOS_ID and (x[1:3, 1:] == PAD_ID).all()
    assert (x[3] != PAD_ID).all() and EOS_ID not in x[3].tolist()  # cut: no eos, no pad
    assert x[3].tolist() == tok.sp.encode(long)[:MAX_TEXT_LEN]
    assert tok.decode(x[0]) == "a photo of a dog"


def test_loader_hook_gives_the_same_tokens(tok_path):
    """The loader's tokenizer hook calls tok(text) per caption, then cuts and pads with tok.pad_id."""
    from aimv2data.loader.captions import resolve_pad_id, tokenize

    tok = Tokenizer(tok_path)
    texts = ["a red car", "", " ".join(["quokka"] * 200), "the sky xylophonist"]
    assert torch.equal(tokenize(texts, tok, resolve_pad_id(tok, None)), tok.encode(texts))


def test_pickles_for_dataloader_workers(tok_path):
    tok = Tokenizer(tok_path)
    again = pickle.loads(pickle.dumps(tok))
    assert torch.equal(again(["a green tree", "quokka"]), tok(["a green tree", "quokka"]))


def test_foreign_model_without_pad_gets_an_extra_id(tmp_path, tok_path):
    root = tok_path.parent
    text = tmp_path / "c.txt"
    text.write_text("\n".join(" ".join(random.Random(i).choices(WORDS, k=9)) for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "foreign"), vocab_size=40,
                                   pad_id=-1, bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    tok = Tokenizer(tmp_path / "foreign.model")
    assert tok.pad_id == 40 and tok.vocab_size == 41 and tok.eos_id == 2
    x = tok(["dog"])
    assert x[0, -1] == 40 and 40 not in tok.ids("dog")
    assert root.exists()


def test_errors_are_clear(tmp_path, tok_path):
    root = tok_path.parent
    with pytest.raises(ValueError, match=r"--vocab-size 5000 is too large.*at most \d+"):
        train_tokenizer(root, tmp_path / "t.model", vocab_size=5000)
    assert not (tmp_path / "t.model").exists()
    small = train_tokenizer(root, tmp_path / "t.model", vocab_size=5000, soft_limit=True)
    assert 20 < small.vocab_size < 5000
    with pytest.raises(ValueError, match="caption column"):
        train_tokenizer(root, tmp_path / "u.model", columns=["syn_missing"])
    with pytest.raises(FileNotFoundError, match="samples"):
        train_tokenizer(tmp_path, tmp_path / "v.model")
    with pytest.raises(FileNotFoundError, match="aimv2 tokenizer train"):
        Tokenizer(tmp_path / "nope.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(tmp_path / "bad.model")


def test_cli(tmp_path, tok_path):
    from cli.main import main

    out = tmp_path / "cli.model"
    r = CliRunner().invoke(main, ["tokenizer", "train", str(tok_path.parent), "-o", str(out),
                                  "--vocab-size", "50", "--column", "caption"])
    assert r.exit_code == 0, r.output
    assert "caption=396" in r.output and Tokenizer(out).vocab_size == 50
    assert UNK_ID in Tokenizer(out).ids("xylophonist")  # trained on `caption` only
    r = CliRunner().invoke(main, ["tokenizer", "train", str(tok_path.parent), "-o", str(out), "--vocab-size", "9999"])
    assert r.exit_code == 1 and "too large" in r.output



def test_captions_are_read_in_key_order_whatever_the_row_order_of_a_part(tmp_path, tok_path):
    # img2dataset writes a tar's samples in the order its downloads finish; sentencepiece's model depends
    # on the order it reads, so the same samples in another order must give the same reading and model
    from aimv2train.train.tokenizer import iter_captions

    ordered = make_manifest(tmp_path / "ordered")
    root = make_manifest(tmp_path / "shuffled")
    for f in (root / "samples").glob("*.parquet"):
        pl.read_parquet(f).reverse().write_parquet(f)
    assert list(iter_captions(root)) == list(iter_captions(ordered))
    out = tmp_path / "tok.model"
    train_tokenizer(root, out, vocab_size=60)
    assert out.read_bytes() == tok_path.read_bytes()
