"""A periodic one-line log for batch jobs (`train --no-progress`): a tqdm bar is useless in a Slurm log,
but silence until the end is worse. Every `interval` seconds (and at the last step) one line on stderr:

    aimv2 train: step 120/1000 (12.0%)  loss 3.2104  img 0.412  txt 2.798  41.3 images/s  replaced 3  ETA 0:12:30
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta


class PeriodicLine:
    def __init__(self, start: int, end: int, interval: float, enabled: bool = True, stream=None):
        self.start, self.end, self.interval, self.enabled = start, end, interval, enabled and interval > 0
        self.stream = stream or sys.stderr
        self.t0 = self.last = time.monotonic()

    def update(self, step: int, rec: dict, replaced_total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < self.interval and step != self.end:
            return
        self.last = now
        done = step - self.start
        eta = (now - self.t0) / done * (self.end - step) if done else 0.0
        print(f"aimv2 train: step {step}/{self.end} ({100 * step / self.end:.1f}%)  loss {rec['loss']:.4f}  "
              f"img {rec['loss_img']:.3f}  txt {rec['loss_text']:.3f}  {rec['images_per_s']:.1f} images/s  "
              f"replaced {replaced_total}  ETA {timedelta(seconds=round(eta))}", file=self.stream, flush=True)
