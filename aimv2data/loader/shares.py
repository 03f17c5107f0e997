"""Which rows each rank reads: the deal of a stream's chunks (parquet row groups) to the ranks. Pure numpy.

For each (stream, epoch) every rank computes the same deal, so every sample is in exactly one rank's
share per epoch and the shares change from epoch to epoch:

* enough chunks (at least one per rank): whole chunks, in an order keyed by (seed, stream, epoch, chunk),
  each to the rank with the fewest rows so far (`deal`). A share is whole row groups: cheap to read.
* fewer chunks than ranks (a small curated source: `aimv2 shard` writes one row group per tar): the
  chunks' rows, in that keyed order, are cut into `world` contiguous runs of N // world or N // world + 1
  rows, starting at an epoch-keyed offset. A run is a list of *spans* (chunk, start, stop): rows
  [start, stop) of a row group in (shard, key) order, so a span does not depend on the order the rows
  were written in (samples.SampleTable sorts the row group before it slices it).
"""
from __future__ import annotations

import heapq

import numpy as np

from .sampler import _M64, DEAL


def _mix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _salt(seed: int, stream: int, epoch: int) -> int:
    return int(_mix64(np.array([(seed * 0x100000001B3 + stream * 31 + epoch * 7 + DEAL) & _M64],
                               dtype=np.uint64))[0])


def _keyed_order(keys: np.ndarray, salt: int) -> np.ndarray:
    return np.lexsort((keys, _mix64(keys.astype(np.uint64) ^ np.uint64(salt))))


def deal(keys: np.ndarray, rows: np.ndarray, seed: int, stream: int, epoch: int, world: int) -> np.ndarray:
    """Rank of each chunk for (stream, epoch): chunks in an order keyed by (seed, stream, epoch, chunk key),
    each to the rank with the fewest rows so far (ties: lowest rank). O(chunks log world); the same on
    every rank. Ranks' shares differ by at most one chunk's rows."""
    heap = [(0, r) for r in range(world)]
    out = np.empty(len(keys), dtype=np.int32)
    for i in _keyed_order(keys, _salt(seed, stream, epoch)).tolist():
        load, r = heapq.heappop(heap)
        out[i] = r
        heapq.heappush(heap, (load + int(rows[i]), r))
    return out


def whole(chunks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Spans (chunk, 0, rows) of whole chunks."""
    chunks = np.asarray(chunks, dtype=np.int64)
    return np.stack([chunks, np.zeros_like(chunks), np.asarray(rows, dtype=np.int64)], axis=1).reshape(-1, 3)


def deal_spans(keys: np.ndarray, rows: np.ndarray, seed: int, stream: int, epoch: int,
               world: int) -> list[np.ndarray]:
    """Per rank, its spans (k, 3) int64 rows (chunk position in `keys`, start, stop), sorted. Whole chunks
    (`deal`) when there are at least `world` of them, else runs of rows cut across the chunks."""
    keys, rows = np.asarray(keys), np.asarray(rows, dtype=np.int64)
    if len(keys) >= world:
        ranks = deal(keys, rows, seed, stream, epoch, world)
        return [whole(np.flatnonzero(ranks == r), rows[ranks == r]) for r in range(world)]
    salt = _salt(seed, stream, epoch)
    order = _keyed_order(keys, salt)
    ends = np.cumsum(rows[order])
    n = int(ends[-1]) if len(ends) else 0
    offset = salt % n if n else 0
    out = []
    for r in range(world):
        lo, hi = offset + r * n // world, offset + (r + 1) * n // world
        if lo >= n:                                   # the run starts past the end: wrap it whole
            lo, hi = lo - n, hi - n
        pieces = [(lo, n), (0, hi - n)] if hi > n else [(lo, hi)]
        spans = [s for a, b in pieces if b > a for s in _cut(order, ends, a, b)]
        out.append(np.array(sorted(spans), dtype=np.int64).reshape(-1, 3))
    return out


def _cut(order: np.ndarray, ends: np.ndarray, a: int, b: int) -> list[tuple[int, int, int]]:
    """Rows [a, b) of the chunks concatenated in `order` (cumulative `ends`) as (chunk, start, stop)."""
    spans = []
    k = int(np.searchsorted(ends, a, side="right"))
    while a < b:
        first = int(ends[k - 1]) if k else 0
        stop = min(b, int(ends[k]))
        spans.append((int(order[k]), a - first, stop - first))
        a, k = stop, k + 1
    return spans
