"""Which caption a sample is trained with, and its tokens.

Per sample: the alt-text (`caption` column) or one synthetic caption (`syn_<name>` columns, list[str]),
with a probability per source. The default is the paper's Table 2 mixture, turned into within-source
probabilities (the rows of Table 2 are joint source x caption-type sampling probabilities):

    DFN   alt 30 %, synthetic 30 %  -> P(alt | DFN)   = 30 / 60 = 0.50
    COYO  alt  6 %                  -> P(alt | COYO)  =  6 /  6 = 1.00
    HQITP alt 28 %, synthetic  3 %  -> P(alt | HQITP) = 28 / 31 = 0.903

(The rows as printed sum to 97 %.) How often each *source* is seen is the manifest's composition; the
loader does not reweight sources. Whatever is missing falls back to what is present: no synthetic
caption -> alt-text, no alt-text -> a synthetic one, neither -> "" (counted by the loader).
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from ..paper import TEXT_LEN
from .sampler import CAPTION, unit

# Table 2 of the AIMv2 paper: joint sampling probabilities in percent.
TABLE2 = {"dfn": {"alt": 30, "synthetic": 30}, "coyo": {"alt": 6, "synthetic": 0},
          "hqitp": {"alt": 28, "synthetic": 3}}
DEFAULT_ALT = 0.5   # sources not in the mix: alt-text and synthetic equally likely
CONTEXT = TEXT_LEN  # the paper truncates captions to 77 tokens (aimv2data/paper.py)


def table2_mix() -> dict[str, float]:
    """P(alt-text | source) from Table 2, plus the `default` for other sources."""
    mix = {s: v["alt"] / (v["alt"] + v["synthetic"]) for s, v in TABLE2.items()}
    mix["default"] = DEFAULT_ALT
    return mix


def _norm(source: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (source or "").lower())


class CaptionChooser:
    def __init__(self, mix: dict[str, float] | None = None, seed: int = 0):
        mix = table2_mix() if mix is None else dict(mix)
        for k, p in mix.items():
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"caption mix: P(alt | {k}) = {p} is not a probability")
        self.mix = {_norm(k): float(p) for k, p in mix.items()}
        self.default = self.mix.get("default", DEFAULT_ALT)
        self.seed = seed

    def p_alt(self, source: str | None) -> float:
        return self.mix.get(_norm(source), self.default)

    def choose(self, epoch: int, row: int, source: str | None, alt: str | None,
               synthetic: dict[str, list[str] | None]) -> tuple[str, str]:
        """(text, kind) with kind 'alt', the synthetic column name, or 'none'."""
        options = [(name, caps) for name, caps in sorted(synthetic.items()) if caps]
        have_alt = bool(alt and alt.strip())
        u = unit(self.seed, epoch, row, CAPTION)
        want_alt = u < self.p_alt(source)
        if have_alt and (want_alt or not options):
            return alt, "alt"
        if options:
            # One synthetic caption uniformly over all sets' entries.
            v = unit(self.seed, epoch, row, CAPTION, 1)
            flat = [(name, c) for name, caps in options for c in caps]
            name, text = flat[int(v * len(flat))]
            return text, name
        return "", "none"


def resolve_pad_id(tokenizer, pad_id: int | None) -> int:
    if pad_id is not None:
        return int(pad_id)
    for attr in ("pad_id", "pad_token_id"):
        v = getattr(tokenizer, attr, None)
        v = v() if callable(v) else v
        if isinstance(v, int) and v >= 0:
            return v
    return 0


def tokenize(texts: list[str], tokenizer: Callable, pad_id: int, length: int = CONTEXT) -> torch.Tensor:
    """int64 (B, length): each caption's ids truncated to `length`, right-padded with `pad_id`.

    `tokenizer(text)` may return a list of ids, a dict with `input_ids` (transformers), or an object
    with `.ids` (tokenizers)."""
    out = torch.full((len(texts), length), pad_id, dtype=torch.int64)
    for i, t in enumerate(texts):
        ids = tokenizer(t)
        if isinstance(ids, dict):
            ids = ids["input_ids"]
        ids = getattr(ids, "ids", ids)
        ids = list(ids)[:length]
        if ids:
            out[i, :len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    return out
