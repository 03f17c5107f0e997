"""Encoded image bytes by (shard, offset, size): a pread per sample locally, ranged GETs from object storage.

The manifest stores where each image member's data starts inside its tar, so the loader never parses
tar headers or streams whole shards: random access over shards is as cheap as sequential access.

Local shards: one pread per sample on a cached descriptor (per process, capped by an LRU).
Shards at URLs (s3://, gs://, ...): a batch's reads go to fsspec's `cat_ranges` at once, so `inflight`
ranged GETs are in flight together and the store's latency is paid once per batch, not per sample;
reads that are neighbours in the same tar (gap <= `coalesce_gap`) become one GET. Errors from the store
(throttling, timeouts, 5xx, dropped connections) are retried with exponential back-off `retries` times;
a read that still fails raises ShardReadError, which the loader counts and replaces like a decode
failure. An optional cache directory keeps fetched samples on local disk up to `cache_bytes`, oldest
evicted first, so a second epoch reads the local disk.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict

from ..storage import filesystem, is_url, local


class ShardReadError(OSError):
    """The bytes of a sample could not be read (missing shard, short read, store errors after retries)."""


class ShardReader:
    def __init__(self, shards: list[str], max_open: int = 64, *, inflight: int = 32, retries: int = 4,
                 backoff_s: float = 0.1, coalesce_gap: int = 64 * 1024, cache_dir: str | None = None,
                 cache_bytes: int = 0):
        self.shards = shards
        self.max_open = max_open
        self.inflight, self.retries, self.backoff_s, self.coalesce_gap = inflight, retries, backoff_s, coalesce_gap
        self.cache = SampleCache(cache_dir, cache_bytes) if cache_dir and cache_bytes > 0 else None
        self.remote = [is_url(s) for s in shards]
        self.stats = {"gets": 0, "retries": 0, "failed": 0, "cache_hits": 0}
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._fs = None
        self._pid = os.getpid()

    def _forked(self) -> None:
        if self._pid != os.getpid():            # forked: the parent's descriptors/clients are not ours
            self._fds, self._fs, self._pid = OrderedDict(), None, os.getpid()

    # -- local files ----------------------------------------------------------------------------
    def _fd(self, shard: int) -> int:
        self._forked()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = local(self.shards[shard])
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShardReadError(f"cannot open shard {path}: {e.strerror}; was it moved since the manifest "
                                 "was built? (paths are relative to the manifest directory)") from None
        self._fds[shard] = fd
        if len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def _pread(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ShardReadError(f"short read in {self.shards[shard]}: {len(data)} of {size} bytes at offset "
                                 f"{offset} (truncated shard?)")
        return data

    # -- the API --------------------------------------------------------------------------------
    def read(self, shard: int, offset: int, size: int) -> bytes:
        out = self.read_many([(shard, offset, size)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def read_many(self, requests: list[tuple[int, int, int]]) -> list[bytes | ShardReadError]:
        """The bytes of each (shard, offset, size), or the ShardReadError of the ones that failed; remote
        reads all in flight together."""
        out: list = [None] * len(requests)
        remote = []
        for i, (shard, offset, size) in enumerate(requests):
            if not self.remote[shard]:
                try:
                    out[i] = self._pread(shard, offset, size)
                except OSError as e:
                    out[i] = e if isinstance(e, ShardReadError) else ShardReadError(f"{self.shards[shard]}: {e}")
                continue
            hit = self.cache.get(self.shards[shard], offset, size) if self.cache else None
            if hit is not None:
                self.stats["cache_hits"] += 1
                out[i] = hit
            else:
                remote.append(i)
        if remote:
            self._read_remote(requests, remote, out)
        return out

    # -- object storage -------------------------------------------------------------------------
    def _filesystem(self):
        self._forked()
        if self._fs is None:
            self._fs = filesystem(next(s for s, r in zip(self.shards, self.remote) if r))[0]
        return self._fs

    def _read_remote(self, requests, todo: list[int], out: list) -> None:
        fs = self._filesystem()
        pending, errors = list(todo), {}
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += len(pending)
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            ranges = coalesce([requests[i] for i in pending], self.coalesce_gap)
            paths = [fs._strip_protocol(self.shards[r[0]]) for r in ranges]
            self.stats["gets"] += len(ranges)
            try:
                datas = fs.cat_ranges(paths, [r[1] for r in ranges], [r[2] for r in ranges],
                                      on_error="return", batch_size=self.inflight)
            except Exception as e:   # the whole call failed (e.g. no connection at all)
                datas = [e] * len(ranges)
            still = []
            for (shard, start, end, members), data in zip(ranges, datas):
                ok = not isinstance(data, BaseException) and len(data) == end - start
                for i in members:
                    if ok:
                        _, offset, size = requests[i]
                        out[i] = bytes(data[offset - start:offset - start + size])
                        if self.cache:
                            self.cache.put(self.shards[shard], offset, size, out[i])
                    else:
                        errors[i] = data if isinstance(data, BaseException) else ValueError(
                            f"short read: {len(data)} of {end - start} bytes")
                        if isinstance(data, (FileNotFoundError, PermissionError)):
                            out[i] = _error(self.shards[shard], requests[i], errors[i], 1)   # permanent
                        else:
                            still.append(i)
            pending = still
            if not pending:
                return
        for i in pending:
            self.stats["failed"] += 1
            out[i] = _error(self.shards[requests[i][0]], requests[i], errors[i], self.retries + 1)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        # Descriptors and store clients do not travel to other processes; the receiver opens its own.
        return {"shards": self.shards, "max_open": self.max_open, "inflight": self.inflight,
                "retries": self.retries, "backoff_s": self.backoff_s, "coalesce_gap": self.coalesce_gap,
                "cache_dir": self.cache.root if self.cache else None,
                "cache_bytes": self.cache.limit if self.cache else 0}

    def __setstate__(self, state):
        shards, max_open = state.pop("shards"), state.pop("max_open")
        self.__init__(shards, max_open, **state)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _error(shard: str, req, e: BaseException, attempts: int) -> ShardReadError:
    _, offset, size = req
    what = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return ShardReadError(f"{shard}: {size} bytes at offset {offset} unreadable after {attempts} attempt(s) ({what})")


def coalesce(reqs: list[tuple[int, int, int]], gap: int) -> list[tuple[int, int, int, list[int]]]:
    """(shard, offset, size) requests -> (shard, start, end, [request numbers]) ranges: requests in the same
    shard whose bytes are at most `gap` apart share one range (one GET instead of several)."""
    order = sorted(range(len(reqs)), key=lambda i: (reqs[i][0], reqs[i][1]))
    ranges: list[tuple[int, int, int, list[int]]] = []
    for i in order:
        shard, offset, size = reqs[i]
        if ranges and ranges[-1][0] == shard and offset - ranges[-1][2] <= gap:
            s, start, end, members = ranges[-1]
            ranges[-1] = (s, start, max(end, offset + size), members + [i])
        else:
            ranges.append((shard, offset, offset + size, [i]))
    return ranges


class SampleCache:
    """Fetched sample bytes on local disk, one file per sample, at most `limit` bytes (oldest first out).
    fsspec's own caches keep whole files or blocks without a size limit; a training set is larger than
    any disk, so this one evicts. Files are written atomically; several worker processes may share it."""

    def __init__(self, root: str, limit: int):
        self.root, self.limit = root, int(limit)
        os.makedirs(root, exist_ok=True)
        self._written = 0

    def _path(self, shard: str, offset: int, size: int) -> str:
        h = hashlib.sha1(f"{shard}\0{offset}\0{size}".encode()).hexdigest()
        return os.path.join(self.root, h[:2], h[2:])

    def get(self, shard: str, offset: int, size: int) -> bytes | None:
        p = self._path(shard, offset, size)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError:
            return None
        if len(data) != size:
            return None
        try:
            os.utime(p)                        # recently used: evicted last
        except OSError:
            pass
        return data

    def put(self, shard: str, offset: int, size: int, data: bytes) -> None:
        if size > self.limit:
            return
        p = self._path(shard, offset, size)
        try:
            os.makedirs(os.path.dirname(p), exist_ok=True)
            tmp = f"{p}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except OSError:
            return                              # a full or read-only cache costs speed, not samples
        self._written += size
        if self._written > self.limit // 10:
            self._written = 0
            self.evict()

    def evict(self) -> None:
        files = []
        for d in os.scandir(self.root):
            if d.is_dir():
                for f in os.scandir(d.path):
                    if not f.name.endswith(".tmp"):
                        st = f.stat()
                        files.append((st.st_mtime, st.st_size, f.path))
        total = sum(f[1] for f in files)
        for _, size, path in sorted(files):
            if total <= self.limit:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass

    def size(self) -> int:
        return sum(f.stat().st_size for d in os.scandir(self.root) if d.is_dir() for f in os.scandir(d.path))
