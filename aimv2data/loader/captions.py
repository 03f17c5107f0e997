"""Which caption a sample is trained with, and its tokens.

Per sample: the alt-text (`caption` column) or one synthetic caption (`syn_<name>` columns, list[str]),
with a probability per source. The default is the paper's Table 2 mixture, turned into within-source
probabilities (the rows of Table 2 are joint source x caption-type sampling probabilities):

    DFN   alt 30 %, synthetic 30 %  -> P(alt | DFN)   = 30 / 60 = 0.50
    COYO  alt  6 %                  -> P(alt | COYO)  =  6 /  6 = 1.00
    HQITP alt 28 %, synthetic  3 %  -> P(alt | HQITP) = 28 / 31 = 0.903

(The rows as printed sum to 97 %; the table is `aimv2data.paper.TABLE2`.) How often each *source* is
seen is the sampler's choice, also from Table 2 by default (its row sums, DFN 60 : COYO 6 : HQITP 31;
`--mix`; loader/sampler.py); this module only picks the caption of a sample already drawn. Whatever is
missing falls back to what is present: no synthetic caption -> alt-text, no alt-text -> a synthetic one,
neither -> "" (counted by the loader).

`--caption-mix coyo:alt=0.5,coyo:recap=0.5` replaces the rows of the sources it names (weights per source
over `alt`, `synthetic` = every attached set pooled, or one set by name); the others keep Table 2.
"""
from __future__ import annotations

import math
import re
from typing import Callable

import torch

from ..paper import TABLE2, TEXT_LEN
from .sampler import CAPTION, unit

DEFAULT_ALT = 0.5   # sources not in the mix: alt-text and synthetic equally likely
CONTEXT = TEXT_LEN  # the paper truncates captions to 77 tokens (aimv2data/paper.py)


def table2_mix() -> dict[str, float]:
    """P(alt-text | source) from Table 2, plus the `default` for other sources."""
    mix = {s: v["alt"] / (v["alt"] + v["synthetic"]) for s, v in TABLE2.items()}
    mix["default"] = DEFAULT_ALT
    return mix


ALT, POOL = "alt", "synthetic"   # the alt-text; every attached set pooled (Table 2's "synthetic")
CAPTION_MIX_HELP = "write e.g. coyo:alt=0.5,coyo:recap=0.5 (SET: alt, synthetic or an attached set's name)"


def _norm(source: str | None) -> str:
    return re.sub(r"[^a-z0-9]", "", (source or "").lower())


def _set_name(name: str) -> str:
    """alt, synthetic, or a caption set's column (`recap` and `syn_recap` are the same set)."""
    name = name.strip()
    return name if name in (ALT, POOL) or name.startswith("syn_") else f"syn_{name}"


def parse_caption_mix(mix) -> tuple[dict[str, dict[str, float]], bool]:
    """(per source: weights over caption sets, replaces Table 2). `--caption-mix` text `SRC:SET=W,...` or
    {src: {set: w}} adds to the paper's rows (sources it does not name keep them); the older form
    {src: P(alt | src)} is a whole table, as before. SRC `default`: sources with no row."""
    if mix is None or mix == "" or mix == "table2":
        return {}, False
    out: dict[str, dict[str, float]] = {}
    replace = isinstance(mix, dict) and all(not isinstance(v, dict) for v in mix.values())
    if isinstance(mix, str):
        for part in mix.split(","):
            key, eq, w = part.partition("=")
            src, colon, name = key.partition(":")
            try:
                if not (eq and colon and src.strip() and name.strip()):
                    raise ValueError
                weight = float(w)
            except ValueError:
                raise ValueError(f"--caption-mix {mix!r}: {part!r} is not SOURCE:SET=WEIGHT; {CAPTION_MIX_HELP}") from None
            sets = out.setdefault(src.strip(), {})
            sets[_set_name(name)] = sets.get(_set_name(name), 0.0) + weight
    elif replace:
        for k, p in mix.items():
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"caption mix: P(alt | {k}) = {p} is not a probability")
            out[k] = {ALT: float(p), POOL: 1.0 - float(p)}
    else:
        out = {k: {_set_name(n): float(w) for n, w in v.items()} for k, v in mix.items()}
    for src, sets in out.items():
        if not all(w >= 0 and math.isfinite(w) for w in sets.values()) or sum(sets.values()) <= 0:
            raise ValueError(f"--caption-mix: the weights of {src} ({sets}) must be >= 0 with a positive sum; "
                             f"{CAPTION_MIX_HELP}")
    return {_norm(k): v for k, v in out.items()}, replace


class CaptionChooser:
    """Per sample one caption set by the source's weights over those the row has: alt-text, a set the
    mix names, or the pooled rest (`synthetic`: one caption uniformly over their entries)."""

    def __init__(self, mix=None, seed: int = 0):
        given, replace = parse_caption_mix(mix)
        paper = {s: {ALT: float(v["alt"]), POOL: float(v["synthetic"])} for s, v in TABLE2.items()}
        self.named = set(given)        # the sources the caller chose for
        self.mix = {"default": {ALT: DEFAULT_ALT, POOL: 1.0 - DEFAULT_ALT},
                    **({} if replace else paper), **given}
        self.seed = seed

    def weights(self, source: str | None) -> dict[str, float]:
        return self.mix.get(_norm(source), self.mix["default"])

    def p_alt(self, source: str | None) -> float:
        w = self.weights(source)
        return w.get(ALT, 0.0) / sum(w.values())

    def set_weight(self, source: str | None, column: str) -> float:
        """The weight of caption set `column` (syn_NAME) for `source`: its own, else the pool's."""
        w = self.weights(source)
        return w[column] if column in w else w.get(POOL, 0.0)

    def choose(self, epoch: int, row: int, source: str | None, alt: str | None,
               synthetic: dict[str, list[str] | None]) -> tuple[str, str]:
        """(text, kind) with kind 'alt', the synthetic column name, or 'none'."""
        w = self.weights(source)
        sets = [(name, caps) for name, caps in sorted(synthetic.items()) if caps]
        own = {n: caps for n, caps in sets if n in w}
        pool = [(n, caps) for n, caps in sets if n not in w]
        have_alt = bool(alt and alt.strip())
        options = ([(ALT, w.get(ALT, 0.0))] if have_alt else []) + [(n, w[n]) for n in own] \
            + ([(POOL, w.get(POOL, 0.0))] if pool else [])
        if sum(x for _, x in options) > 0:
            pick = _pick(options, unit(self.seed, epoch, row, CAPTION))
        else:  # none of what this source's mix gives is here: whatever is (alt-text first)
            pick, pool = (ALT if have_alt else POOL if sets else None), sets
        if pick == ALT:
            return alt, "alt"
        if pick is None:
            return "", "none"
        group = pool if pick == POOL else [(pick, own[pick])]
        v = unit(self.seed, epoch, row, CAPTION, 1)
        flat = [(name, c) for name, caps in group for c in caps]
        name, text = flat[int(v * len(flat))]
        return text, name


def _pick(options: list[tuple[str, float]], u: float) -> str:
    """The option whose share of the cumulative weight holds u (in [0, 1))."""
    total, acc = sum(x for _, x in options), 0.0
    for kind, x in options:
        acc += x
        if x > 0 and u < acc / total:
            return kind
    return [k for k, x in options if x > 0][-1]   # u within rounding of 1


def check_caption_mix(chooser: CaptionChooser, sources: dict[str, str], columns: list[str]) -> list[str]:
    """Refuse names the manifest lacks (a typo); return the notice for attached sets no source draws."""
    for src in chooser.named - {"default", *TABLE2}:
        if src not in sources:
            raise ValueError(f"--caption-mix names source {src!r}, which the manifest does not have (it has: "
                             f"{', '.join(sources.values()) or 'none'})")
    for src in chooser.named:
        unknown = [n for n in chooser.mix[src] if n not in (ALT, POOL) and n not in columns]
        if unknown:
            raise ValueError(f"--caption-mix {src}: caption set {unknown[0][4:]!r} is not attached to the manifest "
                             f"(attached: {', '.join(c[4:] for c in columns) or 'none'})")
    zero = [f"{sources[s] or 'all'}: {c[4:]}" for s in sources for c in columns if chooser.set_weight(s, c) == 0]
    if not zero:
        return []
    return [f"caption mix: attached caption sets with probability 0, never trained on while the alt-text is there "
            f"({'; '.join(zero)}; the paper's Table 2 gives COYO alt-text only): choose with --caption-mix, "
            f"{CAPTION_MIX_HELP}"]


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
