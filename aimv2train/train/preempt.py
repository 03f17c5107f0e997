"""Preemption and Ctrl-C: finish the current step, save a checkpoint, exit with a code a scheduler reads.

Slurm's preemption, `scancel` and a terminal's Ctrl-C signal the whole process group, so the loader's
worker processes receive the signal too; they ignore it (aimv2data.loader.loader._worker_init) and the
trainer alone decides. Exit codes follow the shell's 128 + signal number convention, so
`aimv2 train ... && aimv2 export ...` never exports a partial run and a requeue script can tell a
preempted run (143) from a finished one (0):

    0    done, or stopped at --stop-at
    130  interrupted by SIGINT (Ctrl-C) after saving a checkpoint
    143  interrupted by SIGTERM (preemption, scancel, torchrun shutdown) after saving a checkpoint
"""
from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


def notice(message: str) -> None:
    """A one-line message on stderr (not a Python warning: those name a random library line)."""
    print(f"aimv2 train: {message}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGTERM (a scheduler's preemption notice, torchrun's shutdown) or Ctrl-C: finish the step, save a
    checkpoint, end with status "interrupted" and `exit_code` 128 + signal. A second signal interrupts
    at once."""

    def __init__(self):
        self.requested, self.signum, self._old, self._pid = False, None, {}, os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked process inherited the handler: the trainer decides
            return
        if self.requested:
            stop = KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
            stop.signum = signum  # the CLI exits 128 + signum
            raise stop
        self.requested, self.signum = True, signum
        notice(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
               f"(send it again to stop at once, without a checkpoint)")

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
