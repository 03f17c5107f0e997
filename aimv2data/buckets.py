"""Aspect-ratio buckets and the patch grid of each (bucket, area), for native-resolution batches.

AIMv2 (sec. 2.4) samples an area A = 2^n patches per batch, n in [7, 12], and resizes every image of
the batch to fit A while keeping its aspect ratio. A batch is one tensor, so its images share one grid
h x w (in patches). We group images by aspect ratio into buckets; a batch draws from one bucket, and the
bucket's grid for A is fixed here, once, so that the manifest, the sampler and both decoders agree.

The table (defaults): 33 aspects (w/h) log-spaced from 1:4 to 4:1, i.e. 2^(k/8) for k = -16..16, eight
buckets per doubling of the aspect ratio; 1:1, 2:1 and 4:1 are exact. An image goes to the bucket whose
nominal aspect is nearest in log space (edges at the geometric means of neighbours); images beyond
1:4 / 4:1 go to the end buckets.

The grid of a bucket for area A is the (h, w) with h*w <= A that maximises
    fill * (1 - worst_crop)^4,   fill = h*w/A,
where worst_crop is the largest fraction of an image that is cut off when an image of any aspect in the
bucket's interval is resized to cover the grid and centre-cropped (crop(r, g) = 1 - min(r/g, g/r)).
The exponent says a lost 1% of image content costs as much as 4% fewer patches: patches not used only
lower the resolution a little (the loader can raise the batch size to keep B*h*w constant), cropped
content is gone. See docs/shard.md for the measured crop and fill per area.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from aimv2data.paper import AREAS  # noqa: F401  128 .. 4096 patches, the paper's range (re-exported)

NUM_BUCKETS = 33
MAX_ASPECT = 4.0
CROP_WEIGHT = 4                              # the exponent above


def crop_fraction(image_aspect: float, grid: tuple[int, int]) -> float:
    """Fraction of an image of aspect w/h = image_aspect lost when it is resized to cover `grid` (h, w)
    and centre-cropped."""
    g = grid[1] / grid[0]
    return 1.0 - min(image_aspect / g, g / image_aspect)


@lru_cache(maxsize=4096)
def best_grid(lo: float, hi: float, area: int) -> tuple[int, int]:
    """The (h, w) with h*w <= area that best serves images with aspects in [lo, hi] (see module doc)."""
    if not (0 < lo <= hi) or area < 1:
        raise ValueError(f"best_grid needs 0 < lo <= hi and area >= 1, got lo={lo} hi={hi} area={area}")
    best, best_key = (1, 1), None
    for h in range(1, area + 1):
        w_max = area // h
        w_lo = max(1, math.floor(lo * h))
        if w_lo > w_max:   # w_lo * h > area, and w_lo * h only grows with h
            break
        for w in range(w_lo, min(w_max, math.ceil(hi * h)) + 1):
            g = w / h
            keep = min(lo / g, g / lo, hi / g, g / hi)   # worst case is at an end of the interval
            fill = h * w / area
            key = (fill * keep**CROP_WEIGHT, fill, w)
            if best_key is None or key > best_key:
                best, best_key = (h, w), key
    return best


@dataclass(frozen=True)
class BucketTable:
    aspects: tuple[float, ...]       # nominal w/h per bucket, ascending
    max_aspect: float                # aspects span [1/max_aspect, max_aspect]

    def __len__(self) -> int:
        return len(self.aspects)

    @cached_property
    def edges(self) -> tuple[float, ...]:
        """Assignment boundaries: geometric means of neighbouring aspects (len - 1 of them)."""
        a = self.aspects
        return tuple(math.sqrt(a[i] * a[i + 1]) for i in range(len(a) - 1))

    def interval(self, bucket: int) -> tuple[float, float]:
        """Aspects the bucket's grids are chosen for: its assignment interval clipped to the table range
        (images beyond 1/max_aspect..max_aspect still land in the end buckets, with more crop)."""
        e = self.edges
        lo = 1.0 / self.max_aspect if bucket == 0 else e[bucket - 1]
        hi = self.max_aspect if bucket == len(self) - 1 else e[bucket]
        return lo, hi

    def bucket_of(self, width: int, height: int) -> int:
        return bisect.bisect_right(self.edges, width / height)

    def assign(self, widths, heights) -> np.ndarray:
        """Vectorised bucket_of, int16."""
        r = np.asarray(widths, dtype=np.float64) / np.asarray(heights, dtype=np.float64)
        return np.searchsorted(np.asarray(self.edges), r, side="right").astype(np.int16)

    def grid(self, bucket: int, area: int) -> tuple[int, int]:
        """(h, w) in patches for images of `bucket` at `area` patches; h*w <= area. Any area >= 1 works,
        not only the powers of two stored in _manifest.json."""
        if not 0 <= bucket < len(self):
            raise ValueError(f"bucket {bucket} is not in this table (0..{len(self) - 1})")
        lo, hi = self.interval(bucket)
        return best_grid(lo, hi, int(area))

    def to_json(self, areas=AREAS) -> list[dict]:
        """The `buckets` list of _manifest.json: readers get every grid without our code."""
        edges = self.edges
        out = []
        for b, a in enumerate(self.aspects):
            out.append({
                "id": b,
                "aspect": a,                       # full precision: readers assign exactly as we do
                "lo": None if b == 0 else edges[b - 1],
                "hi": None if b == len(self) - 1 else edges[b],
                "grids": {str(A): list(self.grid(b, A)) for A in areas},
            })
        return out

    def spec(self) -> dict:
        """How the table was made (for _manifest.json's `bucket_spec`)."""
        return {"num_buckets": len(self), "max_aspect": self.max_aspect, "spacing": "log",
                "assign": "nearest aspect in log space (w/h of the display size)",
                "grid_objective": f"max fill * (1 - worst_crop)^{CROP_WEIGHT}, h*w <= area"}


def make_table(num_buckets: int = NUM_BUCKETS, max_aspect: float = MAX_ASPECT) -> BucketTable:
    if num_buckets < 2:
        raise ValueError(f"need at least 2 buckets, got {num_buckets}")
    if max_aspect <= 1:
        raise ValueError(f"max_aspect must be > 1 (the table spans 1/max_aspect..max_aspect), got {max_aspect}")
    logs = np.linspace(-math.log(max_aspect), math.log(max_aspect), num_buckets)
    aspects = np.exp(logs)
    if num_buckets % 2:                     # make 1:1 exact (linspace leaves it at 1 +- 1e-16)
        aspects[num_buckets // 2] = 1.0
    return BucketTable(tuple(float(a) for a in aspects), float(max_aspect))


def table_from_manifest(meta: dict) -> BucketTable:
    """Rebuild the table from a _manifest.json dict (its `bucket_spec`)."""
    spec = meta.get("bucket_spec") or {}
    return make_table(int(spec.get("num_buckets", NUM_BUCKETS)), float(spec.get("max_aspect", MAX_ASPECT)))


DEFAULT = make_table()
