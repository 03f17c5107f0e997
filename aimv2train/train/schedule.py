"""Learning rate: linear warmup to the peak, then cosine decay to the minimum (Table A1; cosine decay
after Loshchilov & Hutter's SGDR [75]).

`lr(step)` is the rate used by optimiser step `step` (0-based):
    step <  warmup:  peak * (step + 1) / warmup
    step >= warmup:  min + (peak - min) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2
and `min` from `total` on. A pure function of the step, so a resumed run needs only the step count.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WarmupCosine:
    peak_lr: float
    min_lr: float
    warmup: int
    total: int

    def __post_init__(self):
        if self.total < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total}")
        if not 0 <= self.warmup <= self.total:
            raise ValueError(f"warmup {self.warmup} must be in [0, total steps {self.total}]")
        if not 0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need 0 <= min lr {self.min_lr} <= peak lr {self.peak_lr}")

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        if step >= self.total:
            return self.min_lr
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer, step: int) -> float:
        """Set every group's lr for `step`, keeping each group's ratio to its own peak; return the lr."""
        lr = self.lr(step)
        for g in optimizer.param_groups:
            g["lr"] = lr * g.get("peak_lr", self.peak_lr) / self.peak_lr
        return lr

    def state_dict(self) -> dict:
        return asdict(self)
