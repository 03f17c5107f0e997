"""What every part of the GPU check shares: the sizes it measures at, the time budget, failure reasons."""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the real sizes on a GPU, tiny ones for --dry-run on CPU."""
    model: str
    batch: int               # fixed resolution, per step (halved on OOM)
    resolution: int
    native_grid: tuple[int, int]
    batch_patches: int       # native resolution: C; batch = C // (h*w)
    text_len: int
    vocab: int
    steps: int               # timed steps per configuration
    warmup: int
    parity_batch: int
    jpegs: int
    native_decode: tuple[int, int]  # (w, h) of the native-resolution decode output
    trainer_steps: int       # the trainer part: timed steps of each `aimv2 train` run
    trainer_model: str = "L"
    trainer_batch: int = 128
    trainer_resolution: int = 224
    trainer_patches: int = 32768   # native resolution's C in the trainer part
    trainer_warmup: int = 3        # untimed steps first (the compile is in step 1)
    trainer_native_areas: int = 2  # distinct areas the native run draws (each a static graph on CUDA)
    trainer_native_max_area: int = 4096   # the largest it may draw (the dry run: small images, cheap steps)


GPU_SIZES = Sizes(model="L", batch=128, resolution=224, native_grid=(23, 37), batch_patches=32768, text_len=77,
                  vocab=32000, steps=10, warmup=3, parity_batch=2, jpegs=128, native_decode=(518, 322),
                  trainer_steps=10)
DRY_SIZES = Sizes(model="tiny", batch=4, resolution=56, native_grid=(3, 5), batch_patches=60, text_len=8,
                  vocab=64, steps=2, warmup=1, parity_batch=2, jpegs=4, native_decode=(70, 42), trainer_steps=2,
                  trainer_model="tiny", trainer_batch=4, trainer_resolution=56, trainer_patches=4096,
                  trainer_warmup=1, trainer_native_areas=1, trainer_native_max_area=128)


def importable(name: str) -> str | None:
    """None if `name` imports, else the one-line reason."""
    try:
        __import__(name)
        return None
    except Exception as e:  # an ImportError, or a broken install that raises something else
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]


class Budget:
    """Wall-clock budget of the whole check: parts and configurations that would not fit are skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def reason(e: BaseException) -> str:
    """One line: the exception and where it was raised."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}{where}"
