"""Encoded image bytes by (shard, offset, size): a pread per sample locally, ranged GETs from object storage.

The manifest stores where each image member's data starts inside its tar, so the loader never parses
tar headers or streams whole shards: random access over shards is as cheap as sequential access.

Local shards: one pread per sample on a cached descriptor (per process, capped by an LRU).
A request that names its sample's key, (shard, offset, size, key) as the loader's do, also reads the 512
bytes before `offset` in the same pread or GET: the member's tar header, whose name, size and checksum
must be the ones the manifest knows. Any other tar put in this one's place (even of the same size) fails
that check, and the read raises TarChangedError ("rebuild the manifest") instead of handing another
sample's bytes on, which could decode and train with the wrong caption.
Shards at URLs (s3://, gs://, ...): a batch's reads go to fsspec's `cat_ranges` at once, so `inflight`
ranged GETs are in flight together and the store's latency is paid once per batch, not per sample;
reads that are neighbours in the same tar (gap <= `coalesce_gap`) become one GET. Errors from the store
(throttling, timeouts, 5xx, dropped connections) are retried with exponential back-off `retries` times;
a read that still fails comes back as a ShardReadError, which the loader counts and replaces like a
decode failure; its `unreachable` flag tells a store that did not answer (after the retries) from a
missing or short object, so the loader counts outages and damaged shards apart. An optional cache
directory keeps fetched samples on local disk up to `cache_bytes`, oldest evicted first, so a second
epoch reads the local disk (cached bytes were checked when fetched).
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
from collections import OrderedDict

from ..storage import filesystem, is_url, local


HEADER = 512                                    # a tar header block: the member's data follows it


class ShardReadError(OSError):
    """The bytes of a sample could not be read (missing shard, short read, store errors after retries).
    `unreachable`: the store did not answer or refused to serve (timeouts, dropped connections, 5xx,
    throttling) for every attempt, so nothing is known to be wrong with the shard itself."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


class TarChangedError(ValueError):
    """A tar's bytes are not the ones its manifest indexed (another tar in its place): no sample of it can be
    trusted, so the loader stops instead of replacing samples one by one."""


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
    def read(self, shard: int, offset: int, size: int, key: str | None = None) -> bytes:
        out = self.read_many([(shard, offset, size) if key is None else (shard, offset, size, key)])[0]
        if isinstance(out, BaseException):
            raise out
        return out

    def read_many(self, requests: list[tuple]) -> list[bytes | ShardReadError]:
        """The bytes of each (shard, offset, size[, key]), or the ShardReadError of the ones that failed;
        remote reads all in flight together. With a key, the member's tar header is read and checked too:
        a mismatch raises TarChangedError (the whole tar is not what the manifest says)."""
        out: list = [None] * len(requests)
        remote = []
        for i, req in enumerate(requests):
            shard, offset, size = req[:3]
            if not self.remote[shard]:
                try:
                    span = _span(req)
                    out[i] = self._member(req, self._pread(*span))
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

    def _member(self, req: tuple, data: bytes) -> bytes:
        """The member's bytes out of what _span(req) read, its header checked when there is one."""
        if _span(req)[1] == req[1]:
            return data
        problem = header_problem(data[:HEADER], req[3], req[2])
        if problem:
            tar = self.shards[req[0]]
            tar = tar if "://" in tar else os.path.normpath(tar)  # name it as the user sees it
            raise TarChangedError(f"{tar}: the tar changed since the manifest was built (at byte "
                                  f"{req[1] - HEADER}, where the manifest has the header of {req[3]!r}, {problem}): "
                                  "rebuild the manifest (rerun `aimv2 shard` with the same inputs and --output; it "
                                  "re-indexes the tars that changed)")
        return data[HEADER:]

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
            # coalesce() numbers the requests it is given (the pending ones): map back to `requests`
            ranges = [(shard, start, end, [pending[j] for j in members]) for shard, start, end, members
                      in coalesce([_span(requests[i]) for i in pending], self.coalesce_gap)]
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
                        _, offset, size = _span(requests[i])
                        out[i] = self._member(requests[i], bytes(data[offset - start:offset - start + size]))
                        if self.cache:
                            self.cache.put(self.shards[shard], *requests[i][1:3], out[i])
                    elif isinstance(data, (FileNotFoundError, PermissionError)) or not isinstance(data, BaseException):
                        # permanent: the object is gone, refused or shorter than the manifest says
                        errors[i] = data if isinstance(data, BaseException) else ValueError(
                            f"short read: {len(data)} of {end - start} bytes (truncated object?)")
                        out[i] = _error(self.shards[shard], requests[i], errors[i], attempt + 1)
                    else:
                        errors[i] = data
                        still.append(i)
            pending = still
            if not pending:
                return
        for i in pending:
            self.stats["failed"] += 1
            out[i] = _error(self.shards[requests[i][0]], requests[i], errors[i], self.retries + 1, unreachable=True)

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


def _error(shard: str, req, e: BaseException, attempts: int, unreachable: bool = False) -> ShardReadError:
    _, offset, size = req[:3]
    what = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    why = "the store did not answer " if unreachable else ""
    return ShardReadError(f"{shard}: {size} bytes at offset {offset} unreadable, {why}after {attempts} attempt(s) "
                          f"({what})", unreachable=unreachable)


def _span(req: tuple) -> tuple[int, int, int]:
    """The bytes to read for (shard, offset, size[, key]): with a key, from the member's tar header on."""
    shard, offset, size = req[:3]
    if len(req) > 3 and req[3] is not None and offset >= HEADER:
        return shard, offset - HEADER, size + HEADER
    return shard, offset, size


def header_problem(block: bytes, key: str, size: int) -> str | None:
    """Why `block` is not the tar header of a `size`-byte member whose webdataset key is `key`, or None.
    (The manifest's `key` is the member name up to the first dot of its basename, manifests/SPEC.md.)"""
    if len(block) != HEADER or block == bytes(HEADER):
        return "no tar header there"
    stored = _octal(block[148:156])
    if stored is None or stored not in (256 + sum(block[:148]) + sum(block[156:]),
                                        256 + sum(struct.unpack_from("148b8x356b", block))):
        return "no tar header there"
    field = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:263] == b"ustar\0" else b""
    name = (prefix + b"/" + field if prefix else field).decode("utf-8", "replace")
    # a long or non-ASCII name lives in a pax/GNU record before this header, which holds it cut or
    # transliterated: then only the size and the checksum are compared
    if key.isascii() and len(key) < 90:
        slash = name.rfind("/") + 1
        dot = name.find(".", slash)
        found = name if dot < 0 else name[:dot]
        if found != key:
            return f"the header of {name!r}"
    got = int.from_bytes(block[125:136], "big") if block[124] & 0x80 else _octal(block[124:136])
    if got != size:
        return f"a member of {got} bytes, not {size}"
    return None


def _octal(field: bytes) -> int | None:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        return None


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
