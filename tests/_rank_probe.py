"""A torchrun worker that runs `python -m cli.main ARGS` and records, per rank, what the torchrun tests check
and torchrun does not report: `PROBE_DIR/pid.RANK` (its pid, so a test can signal each worker as Slurm
does), `PROBE_DIR/exit.RANK` (its exit code) and `PROBE_DIR/log.RANK` (one line per checkpoint CRC check
and per torch.load, with its mmap flag). Two delays make a preemption test deterministic:
PROBE_SLOW_STEP=S sleeps S seconds in each forward from the third on (the run cannot end before the
signal lands) and PROBE_SLOW_SAVE=S sleeps S seconds inside each checkpoint write, after creating
`PROBE_DIR/saving.RANK` (a test signals again mid-save). Used as `torchrun ... -m _rank_probe train ...`
with tests/ on PYTHONPATH."""
import os
import runpy
import sys
import time
import zipfile
from pathlib import Path

import torch

DIR, RANK = Path(os.environ["PROBE_DIR"]), os.environ.get("RANK", "0")


def log(line: str) -> None:
    with open(DIR / f"log.{RANK}", "a") as f:
        f.write(line + "\n")


def install() -> None:
    from aimv2train.train import checkpoint, trainer

    real_testzip, real_load, real_save = zipfile.ZipFile.testzip, torch.load, checkpoint.atomic_torch_save

    def testzip(self):
        log(f"crc {Path(self.filename).name}")
        return real_testzip(self)

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):  # not the in-memory loads of torch.distributed's object collectives
            log(f"load {Path(f).name} mmap={kwargs.get('mmap')}")
        return real_load(f, *args, **kwargs)

    zipfile.ZipFile.testzip, torch.load = testzip, load
    if os.environ.get("PROBE_SLOW_SAVE"):
        def slow_save(obj, path):
            (DIR / f"saving.{RANK}").touch()
            time.sleep(float(os.environ["PROBE_SLOW_SAVE"]))
            real_save(obj, path)
        checkpoint.atomic_torch_save = slow_save
    if os.environ.get("PROBE_SLOW_STEP"):
        real_forward, calls = trainer.LossModule.forward, []

        def forward(self, *args):
            calls.append(1)
            if len(calls) > 2:
                time.sleep(float(os.environ["PROBE_SLOW_STEP"]))
            return real_forward(self, *args)
        trainer.LossModule.forward = forward


def main() -> None:
    (DIR / f"pid.{RANK}").write_text(str(os.getpid()))
    install()
    code = 1
    try:
        sys.argv[0] = "aimv2"
        runpy.run_module("cli.main", run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        (DIR / f"exit.{RANK}").write_text(str(code))


if __name__ == "__main__":
    main()
