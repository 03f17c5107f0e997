"""The `pil` decoder's worker processes: one pool for the loader's life, not one per segment.

A torch DataLoader with `persistent_workers=True` over a map-style dataset whose indices are
(segment serial, step). Workers fork once, at the first segment, inheriting its shares copy-on-write.
For every later segment the loader puts a message in each worker's own inbox (a multiprocessing queue):
the segment's snapshot and plan, and the shares read since the previous message, packed into shared
memory (shared.py: one block per share, sent as a file descriptor, not pickled W times). A worker that
gets a step of a newer segment first reads its inbox up to that segment's message, in order, so it
holds every share it may need whichever steps the DataLoader hands it. The DataLoader still returns
steps in index order.

`persistent=False` is the path before issue 21: a new DataLoader, hence new workers, each segment (kept
for the benchmark and the tests that compare the two).
"""
from __future__ import annotations

import atexit
import multiprocessing
import weakref

import torch

from .shared import pack


class _Indices(torch.utils.data.Sampler):
    """(serial, step) for the steps [start, stop) of the current segment."""

    def __init__(self):
        self.serial, self.start, self.stop = 0, 0, 0

    def __iter__(self):
        serial = self.serial
        return ((serial, i) for i in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class _Segments(torch.utils.data.Dataset):
    """In a worker: step i of segment `serial` -> its Batch, catching up on the inbox first."""

    def __init__(self, maker, manifest, inboxes):
        self.maker, self.manifest, self.inboxes = maker, manifest, inboxes
        self.serial = 0

    def __getitem__(self, index):
        serial, i = index
        if serial != self.serial:
            inbox = self.inboxes[torch.utils.data.get_worker_info().id]
            while self.serial != serial:
                self.serial, snap, plan, fresh = inbox.get()
                for stream, (token, packed) in fresh.items():
                    self.maker.set_table(stream, packed.unpack(keep=self.manifest), token=token)
                self.maker.snap, self.maker.plan = snap, plan
        return self.maker.make(i)


class StepPool:
    """`batches(start, stop)`: an iterator of the current segment's Batches made by `workers` processes."""

    def __init__(self, maker, manifest, *, workers: int, prefetch_factor: int, pin_memory: bool, worker_init_fn,
                 persistent: bool = True):
        self.maker, self.manifest, self.persistent = maker, manifest, persistent
        self.workers = workers
        self.inboxes: list = []                 # one queue per worker, made with the workers
        self.indices = _Indices()
        self.dataset = _Segments(maker, manifest, self.inboxes)
        self.kwargs = dict(batch_size=None, sampler=self.indices, num_workers=workers, prefetch_factor=prefetch_factor,
                           pin_memory=pin_memory, worker_init_fn=worker_init_fn, persistent_workers=persistent)
        self.dl = None
        self._at_exit = None
        self._procs: list = []
        self.sent: dict[str, int] = {}          # stream -> token of the share the workers were last given
        self.packed: dict[int, object] = {}     # token -> its share in shared memory, until sent

    @property
    def started(self) -> bool:
        """Whether the workers exist (shares read from now on reach them through shared memory)."""
        return self.persistent and self.dl is not None

    def share(self, table):
        """The table as the loader should keep it: once the workers exist, a copy in shared memory (the
        private one is dropped) that the next message carries to them."""
        if not self.started:
            return table, None
        packed = pack(table, keep=self.manifest)
        return packed.unpack(keep=self.manifest), packed

    def remember(self, token: int, packed) -> None:
        if packed is not None:
            self.packed[token] = packed

    def batches(self, start: int, stop: int):
        self.dataset.serial += 1
        self.indices.serial, self.indices.start, self.indices.stop = self.dataset.serial, start, stop
        if not self.persistent or self.dl is None:
            if self.persistent:                 # the DataLoader's default context, so the queues travel with it
                ctx = multiprocessing.get_context()
                self.inboxes[:] = [ctx.Queue() for _ in range(self.workers)]
            self.dl = torch.utils.data.DataLoader(self.dataset, **self.kwargs)   # workers fork from this state
            self.sent = dict(self.maker.tokens)
            if self.persistent and self._at_exit is None:
                # The workers ignore SIGTERM (loader._worker_init), so multiprocessing's exit hook, which
                # terminates daemonic children and then joins them, would wait forever: close first.
                # (atexit runs the hooks registered last first; multiprocessing registered its own on import.)
                ref, procs = weakref.ref(self), []
                self._procs = procs
                self._at_exit = lambda: (ref() is not None and ref().close(), _reap(procs))
                atexit.register(self._at_exit)
        else:
            fresh = {s: (t, self.packed[t]) for s, t in self.maker.tokens.items() if self.sent.get(s) != t}
            message = (self.dataset.serial, self.maker.snap, self.maker.plan, fresh)
            for inbox in self.inboxes:
                inbox.put(message)
            self.sent = dict(self.maker.tokens)
            self.packed = {}                    # the messages hold what they carry until the workers read it
        it = iter(self.dl)
        if self.persistent and not self._procs:
            self._procs[:] = it._workers        # reaped at exit even if the pool itself was collected
        return it

    def pids(self) -> list[int]:
        it = getattr(self.dl, "_iterator", None)
        return [w.pid for w in getattr(it, "_workers", [])]

    def close(self) -> None:
        """Stop the workers (what the DataLoader's iterator does when it is collected) and the inboxes."""
        it = getattr(self.dl, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            for w in it._workers:   # after a worker's error torch may leave them up; SIGTERM they ignore
                w.join(timeout=5)
                if w.is_alive():
                    w.kill()
                    w.join()
            self.dl._iterator = None
        for inbox in self.inboxes:
            inbox.cancel_join_thread()          # a message no worker will read must not hold up the exit
            inbox.close()
        self.inboxes.clear()
        self.dl = None
        if self._at_exit is not None:
            atexit.unregister(self._at_exit)
            self._at_exit = None
        self._procs = []


def _reap(procs) -> None:
    """Workers still up at exit (a pool collected after a worker's error, whose DataLoader only sent them
    SIGTERM, which they ignore): killed, so that multiprocessing's exit hook does not wait on them."""
    for w in procs:
        if w.is_alive():
            w.kill()
            w.join()
