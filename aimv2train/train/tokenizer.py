"""Caption tokenizer: a sentencepiece model trained on every caption column of a manifest, and the
callable that turns captions into the fixed (B, 77) id tensor the text decoder reads.

Reserved ids follow SigLIP's (T5 / C4) sentencepiece model, the tokenizer the paper uses (appendix B):
pad = 0, eos = 1, unk = 2, no bos. Encoding is `ids(caption) + [eos]`, cut to 77 tokens (the paper
truncates longer captions), right-padded with pad. A cut caption keeps no eos: it did not end there.
Pad positions are ignored by the text loss, so pad must never be a real token: a foreign .model
without a pad piece gets pad = its vocab size, one id past its pieces (the model's vocab grows by one).
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from aimv2data.atomic import write_bytes_atomic
from aimv2data.manifest.layout import sample_files
from aimv2data.paper import TEXT_LEN

MAX_TEXT_LEN = TEXT_LEN  # 77 (aimv2data/paper.py)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """`Tokenizer(path)(captions) -> LongTensor (B, 77)`; `pad_id`, `eos_id`, `vocab_size` for the model.
    Picklable (the model bytes travel), so DataLoader workers can tokenize."""

    def __init__(self, path: str | os.PathLike, max_len: int = MAX_TEXT_LEN):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer model {self.path} does not exist; train one with "
                                    f"`aimv2 tokenizer train MANIFEST --output tok.model`")
        self.max_len = max_len
        self._load(Path(self.path).read_bytes())

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except RuntimeError as e:
            raise ValueError(f"{self.path} is not a sentencepiece model: {e}") from None
        n = self.sp.vocab_size()
        self.eos_id = self.sp.eos_id()  # -1 if the model has none: captions then end without one
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else n
        self.vocab_size = max(n, self.pad_id + 1)

    @property
    def sha256(self) -> str:
        """The model's content hash: what identifies its ids, whatever the file is called."""
        return hashlib.sha256(self._proto).hexdigest()

    # DataLoader workers pickle the tokenizer: ship the model bytes, not the C++ object.
    def __getstate__(self):
        return {"path": self.path, "max_len": self.max_len, "proto": self._proto}

    def __setstate__(self, state):
        self.path, self.max_len = state["path"], state["max_len"]
        self._load(state["proto"])

    def ids(self, text: str | None) -> list[int]:
        """Token ids of one caption with eos, not cut or padded (None or "" -> [eos])."""
        ids = self.sp.encode(text or "")
        return ids + [self.eos_id] if self.eos_id >= 0 else ids

    def encode(self, texts: Sequence[str | None]) -> torch.Tensor:
        out = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(self.sp.encode([t or "" for t in texts])):
            if self.eos_id >= 0:
                ids = ids + [self.eos_id]
            ids = ids[: self.max_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __call__(self, texts):
        """A list of captions -> (B, 77) LongTensor (`encode`); one caption -> its ids with eos (`ids`),
        the per-caption form the loader's tokenizer hook also accepts (it cuts and pads the same way)."""
        return self.ids(texts) if isinstance(texts, str) or texts is None else self.encode(texts)

    def decode(self, tokens: torch.Tensor | Sequence[int]) -> str:
        """Text of one row of ids, stopping at the first eos and skipping pad."""
        out = []
        for t in (tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
            if t == self.eos_id:
                break
            if t != self.pad_id:
                out.append(t)
        return self.sp.decode(out)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
                f"eos_id={self.eos_id}, max_len={self.max_len})")


# ---------------------------------------------------------------------------------------- training

def caption_columns(schema: dict) -> list[str]:
    """`caption` (str) and every synthetic set `syn_<name>` (list[str]) present in a samples schema."""
    return [c for c in schema if c == "caption" or c.startswith("syn_")]


def _sample_files(manifest: str | os.PathLike) -> list[Path]:
    from aimv2data.manifest.integrity import open_meta, sample_parts
    from aimv2data.storage import upath

    root = upath(manifest)                     # a local directory or a URL (s3://bucket/manifest)
    meta = open_meta(root, required=False)     # damaged, foreign or unreachable: one line naming it
    files = sample_parts(root, meta) if meta is not None else sample_files(root)   # a bare samples/ folder too
    if not files:
        raise FileNotFoundError(f"no samples/*.parquet under {root}: pass a manifest directory made by "
                                f"`aimv2 shard`")
    return files


def iter_captions(manifest: str | os.PathLike, columns: Sequence[str] | None = None,
                  counts: dict[str, int] | None = None) -> Iterator[str]:
    """Every non-empty caption of the chosen columns (all caption columns by default), file by file, each
    file's rows in key order: a tar's rows sit in the order its downloads finished, and sentencepiece's model
    depends on the order it reads. `counts` (if given) is filled with captions yielded per column."""
    import polars as pl

    from aimv2data.manifest.integrity import read_part, read_schema

    for f in _sample_files(manifest):
        schema = read_schema(f)
        cols = caption_columns(schema) if columns is None else [c for c in columns if c in schema]
        if not cols:
            continue
        df = read_part(f, [*cols, "key"]).sort("key") if "key" in schema else read_part(f, cols)
        for c in cols:
            s = df[c]
            if s.dtype == pl.List(pl.String) or isinstance(s.dtype, pl.List):
                s = s.explode()
            s = s.drop_nulls().str.strip_chars()
            s = s.filter(s.str.len_chars() > 0)
            if counts is not None:
                counts[c] = counts.get(c, 0) + len(s)
            yield from s.to_list()


@dataclass
class TokenizerReport:
    output: str
    vocab_size: int
    columns: dict[str, int]  # captions read per column
    sentences: int
    mean_tokens: float  # per caption, eos included, before the cut
    truncated: float  # fraction of captions longer than 77 tokens
    example: str
    example_pieces: list[str]


def train_tokenizer(manifest: str | os.PathLike, output: str | os.PathLike, vocab_size: int = 32000, *,
                    columns: Sequence[str] | None = None, model_type: str = "unigram",
                    character_coverage: float = 0.9995, max_sentences: int = 5_000_000,
                    seed: int = 0, threads: int | None = None, soft_limit: bool = False) -> TokenizerReport:
    """Train a sentencepiece model over the manifest's captions and write it atomically to `output`.

    `soft_limit`: `vocab_size` is an upper bound (sentencepiece's hard_vocab_limit=false), for corpora
    too small to fill it; otherwise too small a corpus is an error that names the largest size it allows.
    """
    if vocab_size < 4:  # pad, eos, unk and at least one piece
        raise ValueError(f"--vocab-size must be at least 4 (pad, eos, unk and one piece), got {vocab_size}")
    all_cols = _checked_caption_columns(manifest, columns)
    counts: dict[str, int] = {}
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_captions(manifest, columns, counts), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            num_threads=threads or os.cpu_count() or 1, minloglevel=2, hard_vocab_limit=not soft_limit,
        )
    except RuntimeError as e:
        msg = str(e)
        if sum(counts.values()) == 0:
            raise ValueError(f"no non-empty captions in {manifest}/samples (columns: "
                             f"{list(columns or sorted(all_cols))})") from None
        if "Vocabulary size too high" in msg:
            most = re.search(r"<= (\d+)", msg)
            raise ValueError(f"--vocab-size {vocab_size} is too large for the {sum(counts.values())} captions "
                             f"in {manifest}: sentencepiece can make at most "
                             f"{most.group(1) if most else 'fewer'} pieces from them. Pass a smaller "
                             f"--vocab-size, or --soft-limit to take what the corpus gives.") from None
        raise
    out = Path(output)
    write_bytes_atomic(out, model.getvalue())
    return _report(out, manifest, columns, counts)


def _checked_caption_columns(manifest, columns: Sequence[str] | None) -> set[str]:
    """The manifest's caption columns; refused when `columns` names one it lacks, or when it has none."""
    from aimv2data.manifest.integrity import read_schema

    all_cols = set()
    for f in _sample_files(manifest):
        all_cols.update(caption_columns(read_schema(f)))
    if columns is not None:
        missing = [c for c in columns if c not in all_cols]
        if missing:
            raise ValueError(f"caption column(s) {missing} not in {manifest}/samples; it has {sorted(all_cols)}")
    elif not all_cols:
        raise ValueError(f"{manifest}/samples has no caption column (`caption` or `syn_<name>`); attach "
                         f"captions with `aimv2 caption attach` first")
    return all_cols


def _report(out: Path, manifest, columns: Sequence[str] | None, counts: dict[str, int]) -> TokenizerReport:
    """Summary over (at most) the first 20k captions: length distribution against the 77-token cut."""
    tok = Tokenizer(out)
    lengths, example = [], None
    for i, text in enumerate(iter_captions(manifest, columns)):
        if i >= 20_000:
            break
        example = example or text
        lengths.append(len(tok.ids(text)))
    return TokenizerReport(
        output=str(out), vocab_size=tok.vocab_size, columns=counts, sentences=sum(counts.values()),
        mean_tokens=sum(lengths) / max(len(lengths), 1),
        truncated=sum(n > MAX_TEXT_LEN for n in lengths) / max(len(lengths), 1),
        example=example or "", example_pieces=tok.sp.encode(example or "", out_type=str),
    )
