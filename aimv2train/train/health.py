"""What the data does to a run, made visible: replaced samples, caption coverage and caption-set shares.

The loader replaces a sample it cannot read or decode (a deleted tar, damaged bytes) with another of
the same bucket, so a step never fails on one bad image; but a run that trains mostly on replacements
is not the run that was asked for. Every step logs `replaced` (global count) in metrics.jsonl, split
into `replaced_unreachable` (the store did not answer) and `replaced_damaged` (anything else), the
progress line shows the running total, the summary the share of all draws, and above
`--warn-replaced` (a share, default 2 %) the run ends with a one-line warning naming examples.

The text objective needs captions: a manifest without a single one would train the decoder on empty
strings (eos only) and report "done"; `train` refuses it unless `--allow-no-captions`.
"""
from __future__ import annotations

import numpy as np

from aimv2data.batch import replaced_kind


def replaced_summary(records: list[dict], examples: list, warn_share: float) -> dict:
    """Totals from metrics.jsonl records (so a resumed run counts its earlier part too), split by why: the
    store did not answer (`replaced_unreachable`: an outage, retry later) or the sample is missing or
    damaged (`replaced_damaged`: check the shards). Records written before the split have only `replaced`:
    counted as damaged, as their warning said."""
    draws = sum(r.get("batch", 0) for r in records)
    replaced = sum(r.get("replaced", 0) for r in records)
    unreachable = sum(r.get("replaced_unreachable", 0) for r in records)
    share = replaced / draws if draws else 0.0
    out = {"replaced": replaced, "replaced_unreachable": unreachable, "replaced_damaged": replaced - unreachable,
           "draws": draws, "replaced_share": share, "replaced_examples": [list(e) for e in examples[:5]]}
    if share > warn_share:
        out["replaced_warning"] = (f"{replaced} of {draws} draws ({100 * share:.1f}%) were replacements (above "
                                   f"--warn-replaced {100 * warn_share:g}%): "
                                   + "; ".join(_why(kind, n, examples) for kind, n in
                                               (("unreachable", unreachable), ("damaged", replaced - unreachable))
                                               if n))
    return out


def _why(kind: str, n: int, examples: list) -> str:
    eg = "; ".join(f"{k}: {why}" for k, why in [e for e in examples if replaced_kind(e[1]) == kind][:2])
    eg = f" (e.g. {eg})" if eg else ""
    if kind == "unreachable":
        return (f"{n} because the store did not answer{eg}: an outage, not the shards; check the store's "
                "endpoint and the network")
    return (f"{n} for samples that could not be read or decoded{eg}; check the shards (`aimv2 stats`, or "
            "rebuild with `aimv2 shard`)")


def caption_coverage(table) -> tuple[int, int]:
    """(samples with at least one non-empty caption column, samples) of a loader SampleTable."""
    has = np.zeros(table.n, dtype=bool)
    for name, col in table.text.items():
        if name == "caption" or name.startswith("syn_"):
            parts = getattr(col, "parts", [col])   # the loader keeps text per chunk (samples.Chunked)
            nulls = [np.broadcast_to(np.asarray(p.null, dtype=bool), (len(p.offsets) - 1,)) for p in parts]
            if nulls:
                has |= ~np.concatenate(nulls)
    return int(has.sum()), int(table.n)


def caption_shares(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, float]]:
    """Per source, the share of its captions drawn from each caption set (alt, syn_<name>, none), from the
    loader's counts since the run began (this rank's draws; they travel in the checkpoint)."""
    out = {}
    for src, per in sorted(counts.items()):
        n = sum(per.values())
        out[src] = {k: v / n for k, v in sorted(per.items())} if n else {}
    return out
