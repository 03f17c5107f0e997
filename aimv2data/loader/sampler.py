"""What goes in each batch: source, area, bucket, rows. Pure and deterministic.

Streams. Each *source* of the mixture is its own stream with its own epochs (`mix`, default the paper's
Table 2: DFN 60, COYO 6, HQITP 31, normalised over the sources the manifest has). Within a stream's
epoch e, the manifest's chunks (parquet row groups) holding that source are dealt to the ranks
(shares.py: whole chunks, or row ranges of them when a source has fewer chunks than ranks). A rank
reads only its share: start-up and memory grow with rows / world, not with the total. Every rank
computes the same deal, so every sample is in exactly one rank's share per epoch, and the shares change
from epoch to epoch.

Per global step t (the same on every rank, whatever the world size):

* area (native resolution, paper sec. 2.4): z ~ N(0, 1) truncated to [-1, 1], mapped to [7, 12] and
  rounded: n, A = 2^n; B = C / A images per rank (`batch_rule="area"`; exact because C is a power of two
  >= 4096) or B = C // (h*w) (`"grid"`). Fixed resolution: A = (R/p)^2, B = batch_size.
* source: the stream furthest behind its share, argmax_s(w_s * T - n_s) over images served so far
  (T = sum n_s, counted as C / A per rank per step). It depends only on the past, not on this step's
  area, so each source sees the same distribution of areas; realised shares stay within one batch of
  the mix at every step.
* bucket (per rank, from its own share): drawn in proportion to the rows it has left this epoch among
  the buckets that still hold B rows; its rows are the next B of the bucket's permutation (keyed by
  seed, stream, epoch, bucket, rank; over the rank's share only).
* when no bucket of the rank's share holds B rows at the step's area, that stream's epoch ends on
  this rank (the leftovers, fewer than B per bucket, wait for the next epoch's deal) and the step is
  taken from the next epoch's share. The area is never changed: all ranks use the same A.

A rank's sampler is a state machine over *segments*: stretches of steps in which no stream changes
epoch on this rank. `plan(snapshot, counts)` replays a segment from its start (a few us a step, no
I/O); the snapshot (global step, images served per stream, epoch and rows used per stream) is all a
resume needs.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from ..paper import TABLE2
from .samples import AREAS, norm_source

# Stream tags: every random decision draws from its own stream so that adding one never shifts another.
AREA, BUCKET, PERM, CROP, CAPTION, REPLACE, DEAL = 1, 2, 3, 4, 5, 6, 7

_M64 = (1 << 64) - 1
_PHI_LO, _PHI_HI = NormalDist().cdf(-1.0), NormalDist().cdf(1.0)

# per-source sampling probabilities in percent: each source's row of Table 2 (alt-text + synthetic)
TABLE2_SOURCES = {s: float(sum(row.values())) for s, row in TABLE2.items()}
ALL = "*"     # the stream of every row, whatever its source (`mix="rows"`: sources as the manifest has them)


def unit(*ints: int) -> float:
    """A uniform in [0, 1) that is a pure function of the integers (splitmix64 over the tuple)."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (v & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return (h >> 11) / float(1 << 53)


def rng(*ints: int) -> np.random.Generator:
    """A numpy Generator seeded by the integers (for permutations and crop draws)."""
    return np.random.default_rng(np.random.SeedSequence([int(i) & _M64 for i in ints]))


def stream_id(name: str) -> int:
    """A stable integer per stream name (keys the deal and the permutations)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 1


def area_exponent(u: float) -> int:
    """n in [7, 12] from a uniform u: inverse CDF of N(0,1) truncated to [-1, 1], linear map, round."""
    z = NormalDist().inv_cdf(_PHI_LO + u * (_PHI_HI - _PHI_LO))
    return min(12, max(7, math.floor(7 + (z + 1) / 2 * 5 + 0.5)))


def area_probabilities() -> dict[int, float]:
    """P(A = 2^n) implied by `area_exponent` (n=7 and n=12 get half-width bins)."""
    cdf = NormalDist().cdf
    out = {}
    for n in range(7, 13):
        lo = max(-1.0, (n - 7.5) / 2.5 - 1)
        hi = min(1.0, (n - 6.5) / 2.5 - 1)
        out[2**n] = (cdf(hi) - cdf(lo)) / (_PHI_HI - _PHI_LO)
    return out


# ------------------------------------------------------------------------------------------ the mixture

def parse_mix(text: str | dict | None) -> dict[str, float] | str | None:
    """`"dfn=0.6,coyo=0.06,hqitp=0.31"` -> {name: weight}; `"rows"` -> "rows"; None / "" -> None (default)."""
    if text is None or text == "" or text == "table2":
        return None
    if isinstance(text, dict):
        out = {str(k): float(v) for k, v in text.items()}
    elif text.strip() == "rows":
        return "rows"
    else:
        out = {}
        for part in text.split(","):
            name, eq, w = part.partition("=")
            try:
                if not eq or not name.strip():
                    raise ValueError
                out[name.strip()] = float(w)
            except ValueError:
                raise ValueError(f"--mix {text!r}: {part!r} is not NAME=WEIGHT; write e.g. "
                                 "dfn=0.60,coyo=0.06,hqitp=0.31 (or 'rows')") from None
    bad = {k: v for k, v in out.items() if not (v >= 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"--mix: negative or non-finite weight {bad}; weights must be >= 0")
    if not out or sum(out.values()) <= 0:
        raise ValueError(f"--mix {text!r}: all weights are zero; give at least one source a positive weight")
    return out


def resolve_mix(mix, sources: dict[str, str]) -> tuple[dict[str, float], list[str]]:
    """Stream weights (normalised, > 0) for a manifest with `sources` (normalised -> spelled), and notices.

    None: Table 2's per-source totals over the sources present (absent ones dropped, the rest
    renormalised); a manifest with none of them is sampled by rows, one stream. "rows": one stream of
    all rows. A dict: its sources; a Table 2 source the manifest lacks is dropped (a notice), as by
    default, so the paper's mix runs on any manifest; any other name it lacks is an error (a typo);
    manifest sources it leaves out are not sampled (a notice)."""
    mix = parse_mix(mix)
    notes = []
    if mix == "rows":
        return {ALL: 1.0}, notes
    if mix is None:
        present = {s: w for s, w in TABLE2_SOURCES.items() if s in sources}
        if not present:
            return {ALL: 1.0}, notes
        dropped = [s for s in TABLE2_SOURCES if s not in sources]
        if dropped:
            notes.append(f"mix: {', '.join(dropped)} not in the manifest: dropped, Table 2 renormalised over "
                         f"{', '.join(present)}")
        weights = present
    else:
        weights, dropped = {}, []
        for k, w in mix.items():
            n = norm_source(k)
            if n not in sources and n in TABLE2_SOURCES:
                dropped.append(k)
                continue
            if n not in sources:
                raise ValueError(f"--mix names source {k!r}, which the manifest does not have (it has: "
                                 f"{', '.join(sources.values()) or 'none'}); fix the name or drop it")
            weights[n] = weights.get(n, 0.0) + w
        weights = {k: w for k, w in weights.items() if w > 0}
        if not weights:
            raise ValueError(f"--mix {mix}: none of its sources with a positive weight is in the manifest (it "
                             f"has: {', '.join(sources.values()) or 'none'}); name one of those")
        if dropped:
            notes.append(f"mix: {', '.join(dropped)} not in the manifest: dropped, the mix renormalised over "
                         f"{', '.join(sources[s] for s in sorted(weights))}")
    left_out = [sources[s] for s in sources if s not in weights]
    if left_out:
        notes.append(f"mix: sources {', '.join(left_out)} have no weight and are not sampled "
                     "(name them in --mix to include them)")
    total = sum(weights.values())
    return {k: weights[k] / total for k in sorted(weights)}, notes


def choose_stream(weights: dict[str, float], served: dict[str, int]) -> str:
    """The stream furthest behind its share of the images served so far (ties: larger weight, then name)."""
    total = sum(served.values())
    return max(weights, key=lambda s: (weights[s] * total - served.get(s, 0), weights[s], s))


# -------------------------------------------------------------------------------------- steps and plans

@dataclass(frozen=True)
class StepSpec:
    source_epoch: int          # the epoch of the step's source stream
    global_step: int           # global step t
    area: int                  # A (h*w <= A); B = C / A
    bucket: int                # -1 in fixed-resolution mode
    grid: tuple[int, int]
    rows: np.ndarray           # this rank's rows of the stream's share table, len == batch size
    source: str = ALL          # the stream


@dataclass
class Snapshot:
    """Where a segment starts: JSON-able, all a resume needs (with the step offset in the segment)."""
    segment: int = 0
    t: int = 0                                            # global step of the segment's first step
    served: dict = field(default_factory=dict)            # stream -> images served per rank (C / A a step)
    epochs: dict = field(default_factory=dict)            # stream -> its epoch
    used: dict = field(default_factory=dict)              # stream -> {bucket: rows of this rank's share used}

    def to_dict(self) -> dict:
        return {"segment": self.segment, "t": self.t, "served": dict(self.served), "epochs": dict(self.epochs),
                "used": {s: {str(b): n for b, n in u.items()} for s, u in self.used.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Snapshot":
        return cls(int(d["segment"]), int(d["t"]), {k: int(v) for k, v in d["served"].items()},
                   {k: int(v) for k, v in d["epochs"].items()},
                   {s: {int(b): int(n) for b, n in u.items()} for s, u in d["used"].items()})


class Sampler:
    """Steps of one rank: native resolution (`grids` per bucket per area) or fixed (`fixed_grid`)."""

    def __init__(self, weights: dict[str, float], *, native: bool, batch_patches: int = 2**16,
                 grids: dict[int, dict[int, tuple[int, int]]] | None = None, batch_rule: str = "area",
                 fixed_grid: tuple[int, int] | None = None, batch_size: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.weights, self.native, self.seed = dict(weights), native, int(seed)
        self.rank, self.world = int(rank), int(world_size)
        self.ids = {s: stream_id(s) for s in weights}
        if native:
            c = int(batch_patches)
            if c < 4096 or c & (c - 1):
                raise ValueError(f"--batch-patches must be a power of two >= 4096 so that B = C / A is exact for "
                                 f"every A in 128..4096; got {batch_patches}")
            if batch_rule not in ("area", "grid"):
                raise ValueError(f"batch_rule must be 'area' (B = C / A) or 'grid' (B = C // (h*w)), got "
                                 f"{batch_rule!r}")
            self.c, self.rule, self.grids = c, batch_rule, grids
            self.max_batch = c // AREAS[0] if batch_rule == "area" else max(
                c // (h * w) for g in grids.values() for h, w in g.values())
        else:
            if batch_size < 1:
                raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
            self.grid, self.b = fixed_grid, int(batch_size)
            self.c = self.b * fixed_grid[0] * fixed_grid[1]
            self.max_batch = self.b
        self._perms = {}

    # per step
    def area(self, t: int) -> int:
        if not self.native:
            return self.grid[0] * self.grid[1]
        return 2 ** area_exponent(unit(self.seed, t, AREA))

    def nominal(self, area: int) -> int:
        """Images a step of this area counts for the mixture (the same on every rank)."""
        return self.c // area if self.native else self.b

    def batch(self, area: int, bucket: int) -> int:
        if not self.native:
            return self.b
        if self.rule == "area":
            return self.c // area
        h, w = self.grids[bucket][area]
        return self.c // (h * w)

    def grid_of(self, area: int, bucket: int) -> tuple[int, int]:
        return self.grids[bucket][area] if self.native else self.grid

    # per segment
    def plan(self, snap: Snapshot, counts: dict[str, dict[int, int]]) -> tuple[np.ndarray, str]:
        """(steps, 5) int64 rows (area, stream index, bucket, start in the bucket's order, B) of the segment
        that starts at `snap`, and the stream whose epoch ends after it on this rank. `counts`: rows per
        bucket of this rank's current share of each stream."""
        names = sorted(self.weights)
        served = {s: snap.served.get(s, 0) for s in names}
        buckets = {s: np.array(sorted(counts[s]), dtype=np.int64) for s in names}
        total = {s: np.array([counts[s][b] for b in buckets[s].tolist()], dtype=np.int64) for s in names}
        left = {s: total[s] - np.array([snap.used.get(s, {}).get(b, 0) for b in buckets[s].tolist()], dtype=np.int64)
                for s in names}
        need_of = {}          # (stream, area) -> B per bucket
        out, t = [], snap.t
        while True:
            s = choose_stream(self.weights, served)
            area = self.area(t)
            if (s, area) not in need_of:
                need_of[s, area] = np.array([self.batch(area, b) for b in buckets[s].tolist()], dtype=np.int64)
            need, have = need_of[s, area], left[s]
            w = np.where(have >= need, have, 0)
            if not w.any():
                if not np.array_equal(have, total[s]) or not have.any():
                    return np.array(out, dtype=np.int64).reshape(-1, 5), s
                # A share whose every bucket is smaller than one batch (a tiny manifest): the batch cycles
                # through the rows of one bucket (drawn by size), and the stream's epoch ends after it.
                w = have
            cum = np.cumsum(w)
            i = int(np.searchsorted(cum, unit(self.seed, t, self.rank, BUCKET) * cum[-1], side="right"))
            out.append((area, names.index(s), int(buckets[s][i]), int(total[s][i] - have[i]), int(need[i])))
            have[i] = max(0, int(have[i]) - int(need[i]))
            served[s] += self.nominal(area)
            t += 1

    def advance(self, snap: Snapshot, plan: np.ndarray, steps: int, roll: str | None) -> Snapshot:
        """The snapshot after the first `steps` steps of `plan` (and, when `roll`, that stream's next epoch)."""
        names = sorted(self.weights)
        served, used = dict(snap.served), {s: dict(u) for s, u in snap.used.items()}
        for area, si, b, _, n in plan[:steps].tolist():
            s = names[si]
            served[s] = served.get(s, 0) + self.nominal(area)
            used.setdefault(s, {})[b] = used.get(s, {}).get(b, 0) + n
        epochs = dict(snap.epochs)
        if roll is not None:
            epochs[roll] = epochs.get(roll, 0) + 1
            used[roll] = {}
        return Snapshot(snap.segment + 1 if roll is not None else snap.segment, snap.t + steps, served, epochs,
                        used)

    def order(self, stream: str, epoch: int, bucket: int, members: np.ndarray) -> np.ndarray:
        """This rank's permutation of its share's rows of `bucket` (keyed by stream, epoch, bucket, rank)."""
        key = (stream, epoch, bucket)
        if key not in self._perms:
            if len(self._perms) > 256:
                self._perms.clear()
            self._perms[key] = rng(self.seed, self.ids[stream], epoch, bucket, self.rank, PERM).permutation(members)
        return self._perms[key]

    def replacement(self, spec: StepSpec, members: np.ndarray, slot: int, attempt: int) -> int:
        """Another row of the same bucket of the rank's share for a sample that failed to decode."""
        u = unit(self.seed, spec.global_step, self.rank, slot, attempt, REPLACE)
        return int(members[int(u * len(members))])
