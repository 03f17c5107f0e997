"""A share table in shared memory, for the loader's persistent worker processes (pool.py).

Workers that live across segments cannot inherit a share read after they started (fork copies memory
once). Pickling the table to each of W workers would copy it W times; instead every numpy array of the
object is copied once into one block of shared memory (a torch storage: torch's multiprocessing sends it
as a file descriptor, refcounted, freed when the last process drops it), and only the small rest is
pickled. The loader keeps the shared version itself, so a rank holds one copy, as with fork.
"""
from __future__ import annotations

import io
import pickle

import numpy as np
import torch

_ALIGN = 64


class Packed:
    """`pack(obj)`'s result: picklable through torch.multiprocessing queues; `unpack()` rebuilds the object
    with its arrays as views of the shared block (read-only by convention: nothing writes a share)."""

    def __init__(self, skeleton: bytes, slots: list[tuple[int, str, tuple]], block: torch.Tensor):
        self.skeleton, self.slots, self.block = skeleton, slots, block

    def unpack(self, keep=None):
        """The object; `keep`, if given, stands for the object `pack` was told to leave out (`keep=`)."""
        buf = self.block.numpy()

        class Loader(pickle.Unpickler):
            def persistent_load(_, pid):
                if pid == "keep":
                    return keep
                off, dtype, shape = self.slots[pid]
                n = int(np.prod(shape)) * np.dtype(dtype).itemsize
                return buf[off:off + n].view(dtype).reshape(shape)

        return Loader(io.BytesIO(self.skeleton)).load()


def pack(obj, keep=None) -> Packed:
    """Copy every numpy array in `obj` into one shared-memory block; `keep`: an object not to pickle (the
    receiver has its own, e.g. the manifest), passed again to `unpack`."""
    arrays, index = [], {}

    class Saver(pickle.Pickler):
        def persistent_id(_, x):
            if keep is not None and x is keep:
                return "keep"
            if isinstance(x, np.ndarray) and x.dtype != object:
                if id(x) not in index:
                    index[id(x)] = len(arrays)
                    arrays.append(x)
                return index[id(x)]
            return None

    out = io.BytesIO()
    Saver(out, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    slots, off = [], 0
    for a in arrays:
        slots.append((off, a.dtype.str, a.shape))
        off += -(-a.nbytes // _ALIGN) * _ALIGN
    # share_memory_() copies the untouched (zero-page) allocation: no private copy is made resident
    block = torch.empty(max(off, 1), dtype=torch.uint8).share_memory_()
    buf = block.numpy()
    for a, (o, _, _) in zip(arrays, slots):
        buf[o:o + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    return Packed(out.getvalue(), slots, block)
