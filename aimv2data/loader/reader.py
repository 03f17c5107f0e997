"""Encoded image bytes by (shard, offset, size): one pread per sample on a cached file descriptor.

The manifest stores where each image member's data starts inside its tar, so the loader never parses
tar headers or streams whole shards: random access over shards is as cheap as sequential access.
Descriptors are per process (a forked worker reopens its own) and capped by an LRU.
"""
from __future__ import annotations

import os
from collections import OrderedDict


class ShardReadError(OSError):
    """The bytes of a sample could not be read (missing shard, short read)."""


class ShardReader:
    def __init__(self, shards: list[str], max_open: int = 64):
        self.shards = shards
        self.max_open = max_open
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():            # forked: the parent's descriptors are not ours to cache
            self._fds, self._pid = OrderedDict(), os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        path = self.shards[shard]
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

    def read(self, shard: int, offset: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise ShardReadError(f"short read in {self.shards[shard]}: {len(data)} of {size} bytes at offset "
                                 f"{offset} (truncated shard?)")
        return data

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds.clear()

    def __getstate__(self):
        # Descriptors do not travel to other processes; the receiver opens its own.
        return {"shards": self.shards, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["shards"], state["max_open"])

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
