"""Decode ahead: run an iterator of batches in a background thread, `depth` items ahead of the consumer.

Used by the `dali` decoder, which runs in the trainer's process: while the model trains on step N, the
thread already reads and decodes steps N+1 .. N+depth. DALI's `run()` (and, on a GPU, nvJPEG and the
kernels) executes in C++ without the GIL, so the decode truly overlaps the training step; the Python
parts of a step (manifest reads, crop draws, captions) are short.

Determinism is untouched: the thread consumes the same generator, in the same order, that the
synchronous path iterates in the caller's thread (every batch is `StepMaker.make(epoch, step)`, a pure
function), so the batches are identical; only *when* they are made changes. One thread makes all the
steps, so the DALI pipeline and the shard readers are only ever used by one thread at a time.

`Background`: one call in a thread (the loader reads the next segment's share with it).
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def ahead(items: Iterable[T], depth: int = 2, name: str = "aimv2-decode-ahead") -> Iterator[T]:
    """Yield `items` in order while a daemon thread produces up to `depth` of them in advance.

    An exception in the producer is re-raised here, at the item where it happened (the items before it
    are delivered first). Closing the generator early (a `break` in the consumer) stops the thread:
    it finishes at most the item it is making, which is discarded."""
    if depth < 1:
        raise ValueError(f"decode-ahead depth must be >= 1, got {depth}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(_Failure(e))
            return
        put(_DONE)

    t = threading.Thread(target=produce, name=name, daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is _DONE:
                return
            if isinstance(x, _Failure):
                raise x.exc
            yield x
    finally:
        stop.set()
        t.join()


class Background:
    """`fn()` run once in a daemon thread (a daemon: a process that exits, e.g. on preemption, does not
    wait for a read it no longer needs); `result()` waits for it and re-raises its error here."""

    def __init__(self, key, fn, name: str = "aimv2-read-ahead"):
        self.key = key
        self._done = threading.Event()
        self._result = self._error = None
        threading.Thread(target=self._run, args=(fn,), name=name, daemon=True).start()

    def _run(self, fn) -> None:
        try:
            self._result = fn()
        except BaseException as e:  # handed to the caller of result()
            self._error = e
        finally:
            self._done.set()

    def ready(self, timeout: float | None = 0) -> bool:
        return self._done.wait(timeout)

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result
