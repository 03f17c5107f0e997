"""Preemption and Ctrl-C: finish the current step, save a checkpoint, exit with a code a scheduler reads.

Slurm's preemption, `scancel` and a terminal's Ctrl-C signal the whole process group, so the loader's
worker processes receive the signal too; they ignore it (aimv2data.loader.loader._worker_init) and the
trainer alone decides. Exit codes follow the shell's 128 + signal number convention, so
`aimv2 train ... && aimv2 export ...` never exports a partial run and a requeue script can tell a
preempted run (143) from a finished one (0); under torchrun every rank exits with it:

    0    done, or stopped at --stop-at
    130  interrupted by SIGINT (Ctrl-C) after saving a checkpoint
    143  interrupted by SIGTERM (preemption, scancel, torchrun shutdown) after saving a checkpoint

Signals come more than once: Slurm signals every process of the step and torchrun forwards its own copy to
each worker, a second `scancel` or the time limit's SIGTERM can follow, each while a step or a checkpoint
write of tens of seconds is under way. Those repeats count as one, so the checkpoint is still written:
a repeated SIGTERM always (a scheduler that means it sends SIGKILL next), a repeated SIGINT within
REPEAT_GRACE_S of the first (a launcher's forwarded copy). A later Ctrl-C stops at once, without a
checkpoint, unless a checkpoint is being written: a write is finished first, then the run stops.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
REPEAT_GRACE_S = 5.0  # a repeated SIGINT this soon after the first is a forwarded copy, not a second Ctrl-C


def notice(message: str) -> None:
    """A one-line message on stderr (not a Python warning: those name a random library line)."""
    print(f"aimv2 train: {message}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGTERM (a scheduler's preemption notice, torchrun's shutdown) or Ctrl-C: finish the step, save a
    checkpoint, end with status "interrupted" and `exit_code` 128 + the first signal. Repeats count as one
    (module docstring); a Ctrl-C after REPEAT_GRACE_S, outside a checkpoint write, interrupts at once."""

    def __init__(self):
        self.requested, self.signum, self._old, self._pid = False, None, {}, os.getpid()
        self._first_at, self._saving = 0.0, False
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked process inherited the handler: the trainer decides
            return
        if not self.requested:
            self.requested, self.signum, self._first_at = True, signum, time.monotonic()
            notice(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                   f"(a second Ctrl-C after {REPEAT_GRACE_S:g} s, or SIGKILL, stops at once, without one)")
        elif self._stops_at_once(signum):
            stop = KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
            stop.signum = signum  # the CLI exits 128 + signum
            raise stop
        else:
            notice(f"{signal.Signals(signum).name} again: already stopping after the checkpoint (repeats count as one)")

    def _stops_at_once(self, signum) -> bool:
        """A repeat that is a person's second Ctrl-C, not a copy of the first request (module docstring)."""
        return (signum == signal.SIGINT and not self._saving
                and time.monotonic() - self._first_at > REPEAT_GRACE_S)

    @contextlib.contextmanager
    def saving(self):
        """While a checkpoint is written no signal aborts it (the run stops after it, as requested)."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1) if self.requested else 0

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
