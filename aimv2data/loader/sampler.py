"""What goes in each batch: rows, area, grid. Pure and deterministic.

Every decision is a function of (seed, epoch, step) and the manifest, so that all ranks agree on the
area and bucket of a step without talking, any worker can compute any step, and a run resumes from
(epoch, step) alone.

Native resolution (AIMv2 paper, sec. 2.4): per global step draw z ~ N(0, 1) truncated to [-1, 1],
map it linearly to [7, 12] and round: n, A = 2^n patches per image, B = C / A images per rank
(exact because C is a power of two >= 4096; `batch_rule="area"`, the default). The grid h x w of a
bucket at A has h*w <= A, so a step uses B*h*w <= C patches; `batch_rule="grid"` instead takes
B = floor(C / (h*w)) (the paper's A_i read as the patches an image really has), which fills the budget
to within one image. The bucket is drawn in proportion to the samples it has left this epoch, among
buckets that still hold a full global batch (B * world). When none does for the drawn A, the step
takes the next larger area that some bucket can still fill (fewer images); when not even A = 4096
fits, the epoch ends and the leftovers (< C/4096 * world per bucket) wait for the next epoch's fresh
permutation.

Fixed resolution: one permutation of all rows per epoch, B * world rows per step, last partial dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from .samples import AREAS

# Stream tags: every random decision draws from its own stream so that adding one never shifts another.
AREA, BUCKET, PERM, CROP, CAPTION, REPLACE = 1, 2, 3, 4, 5, 6

_M64 = (1 << 64) - 1
_PHI_LO, _PHI_HI = NormalDist().cdf(-1.0), NormalDist().cdf(1.0)


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


@dataclass(frozen=True)
class StepSpec:
    epoch: int
    step: int
    area: int                  # A actually used (h*w <= A); B = C / A
    drawn_area: int            # A drawn for the step (differs only at the epoch tail)
    bucket: int                # -1 in fixed-resolution mode
    grid: tuple[int, int]
    rows: np.ndarray           # this rank's manifest rows, len == batch size


class NativeSampler:
    """Area-sampled constant-patch-budget steps; C patches per rank per step."""

    def __init__(self, members: dict[int, np.ndarray], grids: dict[int, dict[int, tuple[int, int]]],
                 batch_patches: int, seed: int = 0, rank: int = 0, world_size: int = 1, batch_rule: str = "area"):
        c = int(batch_patches)
        if c < 4096 or c & (c - 1):
            raise ValueError(f"--batch-patches must be a power of two >= 4096 so that B = C / A is exact for "
                             f"every A in 128..4096; got {batch_patches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if batch_rule not in ("area", "grid"):
            raise ValueError(f"batch_rule must be 'area' (B = C / A) or 'grid' (B = C // (h*w)), got {batch_rule!r}")
        self.members, self.grids = members, grids
        self.c, self.seed, self.rank, self.world = c, int(seed), int(rank), int(world_size)
        self.rule = batch_rule
        self.bucket_ids = np.array(sorted(members), dtype=np.int64)
        # images per rank for (area, bucket), as arrays over bucket_ids
        self._b = {a: np.array([self._batch(a, int(b)) for b in self.bucket_ids], dtype=np.int64) for a in AREAS}
        self._plan_epoch, self._plan, self._perm_epoch, self._perms = None, None, None, {}

    def _batch(self, area: int, bucket: int) -> int:
        if self.rule == "area":
            return self.c // area
        h, w = self.grids[bucket][area]
        return self.c // (h * w)

    @property
    def max_batch(self) -> int:
        return int(max(v.max() for v in self._b.values()))

    def plan(self, epoch: int) -> np.ndarray:
        """(steps, 5) int64: drawn area, area, bucket, start offset in the bucket's epoch order, B."""
        if self._plan_epoch == epoch:
            return self._plan
        counts = np.array([len(self.members[b]) for b in self.bucket_ids], dtype=np.int64)
        left = counts.copy()
        rows, step = [], 0
        while True:
            drawn = 2 ** area_exponent(unit(self.seed, epoch, step, AREA))
            area = drawn
            while area <= AREAS[-1] and not (left >= self._b[area] * self.world).any():
                area *= 2                       # epoch tail: a smaller batch of larger images
            if area > AREAS[-1]:
                break                           # nothing can fill even A = 4096: the epoch ends
            need = self._b[area] * self.world
            weights = np.where(left >= need, left, 0)
            cum = np.cumsum(weights)
            i = int(np.searchsorted(cum, unit(self.seed, epoch, step, BUCKET) * cum[-1], side="right"))
            rows.append((drawn, area, int(self.bucket_ids[i]), int(counts[i] - left[i]), int(self._b[area][i])))
            left[i] -= need[i]
            step += 1
        self._plan_epoch, self._plan = epoch, np.array(rows, dtype=np.int64).reshape(-1, 5)
        return self._plan

    def steps(self, epoch: int) -> int:
        return len(self.plan(epoch))

    def bucket_order(self, epoch: int, bucket: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm_epoch, self._perms = epoch, {}
        if bucket not in self._perms:
            self._perms[bucket] = rng(self.seed, epoch, bucket, PERM).permutation(self.members[bucket])
        return self._perms[bucket]

    def spec(self, epoch: int, step: int) -> StepSpec:
        plan = self.plan(epoch)
        if not 0 <= step < len(plan):
            raise IndexError(f"step {step} outside epoch {epoch} ({len(plan)} steps)")
        drawn, area, bucket, start, b = (int(v) for v in plan[step])
        lo = start + self.rank * b
        rows = self.bucket_order(epoch, bucket)[lo:lo + b]
        return StepSpec(epoch, step, area, drawn, bucket, self.grids[bucket][area], rows)

    def replacement(self, spec: StepSpec, slot: int, attempt: int) -> int:
        """Another row of the same bucket for a sample that failed to decode."""
        members = self.members[spec.bucket]
        u = unit(self.seed, spec.epoch, spec.step, self.rank, slot, attempt, REPLACE)
        return int(members[int(u * len(members))])


class FixedSampler:
    """Fixed-resolution steps: batch_size rows per rank per step, one permutation per epoch."""

    def __init__(self, n: int, bucket_of: np.ndarray, members: dict[int, np.ndarray], resolution: int,
                 patch_size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if resolution % patch_size:
            raise ValueError(f"--resolution {resolution} is not a multiple of the patch size {patch_size}")
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.bucket_of, self.members = n, bucket_of, members
        self.b, self.seed, self.rank, self.world = int(batch_size), int(seed), int(rank), int(world_size)
        self.max_batch = self.b
        g = resolution // patch_size
        self.grid = (g, g)
        self.c = self.b * g * g
        self._perm_epoch, self._perm = None, None
        if self.steps(0) == 0:
            raise ValueError(f"the manifest has {n} samples, fewer than one global batch "
                             f"({batch_size} x {world_size} ranks)")

    def steps(self, epoch: int) -> int:
        return self.n // (self.b * self.world)

    def order(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm_epoch, self._perm = epoch, rng(self.seed, epoch, PERM).permutation(self.n)
        return self._perm

    def spec(self, epoch: int, step: int) -> StepSpec:
        if not 0 <= step < self.steps(epoch):
            raise IndexError(f"step {step} outside epoch {epoch} ({self.steps(epoch)} steps)")
        lo = (step * self.world + self.rank) * self.b
        area = self.grid[0] * self.grid[1]
        return StepSpec(epoch, step, area, area, -1, self.grid, self.order(epoch)[lo:lo + self.b])

    def replacement(self, spec: StepSpec, slot: int, attempt: int) -> int:
        bucket = int(self.bucket_of[spec.rows[slot]])
        members = self.members[bucket]
        u = unit(self.seed, spec.epoch, spec.step, self.rank, slot, attempt, REPLACE)
        return int(members[int(u * len(members))])
