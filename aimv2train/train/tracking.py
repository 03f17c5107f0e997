"""Experiment trackers: `--report-to tensorboard,wandb` (open_clip's flag name and meaning).

Every record `MetricsLog` writes to RUN/metrics.jsonl also goes to each tracker (a "sink"), so the
trackers show exactly the numbers in the file: every loss term, lr, grad norm, throughput, MFU, and
the validation losses (`val_*` keys) when they are computed. Only rank 0 opens trackers.

Tags: a key `k` is logged as `train/k`, a key `val_k` as `val/k`; lists of numbers (e.g. `grid`) as
`train/grid_0`, `train/grid_1`; non-numbers are skipped. The x axis is the record's `step`.

- tensorboard: `torch.utils.tensorboard.SummaryWriter` writing event files to RUN/tensorboard/
  (`tensorboard --logdir RUN/tensorboard`). On resume, `purge_step` hides the steps the run redoes,
  as metrics.jsonl is cut back.
- wandb: `wandb.init(dir=RUN, project=..., config=run.json's content)`; wandb reads its own environment
  (WANDB_MODE=offline writes RUN/wandb/offline-run-*/ with no network; `wandb sync` uploads it later).
  The run id is kept in RUN/wandb_id so that `--resume` continues the same wandb run.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

from aimv2data.environment import keep_signal_handlers

TRACKERS = ("tensorboard", "wandb")
INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the package that provides it


class TrackingError(RuntimeError):
    """A tracker that was asked for cannot be used (unknown name, package missing)."""


class Sink(Protocol):
    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


def parse_report_to(value: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "" / None / "none" -> []."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [s.strip().lower() for s in items if s.strip() and s.strip().lower() != "none"]
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise TrackingError(f"--report-to {bad[0]!r} is not a tracker: choose from {', '.join(TRACKERS)} "
                            f"(comma-separated, e.g. --report-to tensorboard,wandb)")
    return list(dict.fromkeys(names))


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers under their tracker tags (see the module docstring)."""
    out = {}
    for key, value in record.items():
        if key == "step":
            continue
        tag = f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[tag] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{tag}_{i}": float(v) for i, v in enumerate(value)})
    return out


def _require(name: str, module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingError(f"--report-to {name} needs the `{INSTALL[name]}` package: "
                            f"pip install {INSTALL[name]} (or drop {name} from --report-to)") from None


class TensorBoardSink:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        _require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.dir = run_dir / "tensorboard"
        # purge_step: events at or after it, left by an interrupted run, are hidden on resume
        self.writer = SummaryWriter(str(self.dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict) -> None:
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # each step visible to a live TensorBoard

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict, project: str, resume: bool):
        self.wandb = _require("wandb", "wandb")
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        with keep_signal_handlers():  # wandb.init installs its own SIGTERM handler; preemption is the trainer's
            self.run = self.wandb.init(project=project, dir=str(run_dir), name=run_dir.name, config=config,
                                       id=run_id, resume="allow" if run_id else None)
        if self.run is not None and getattr(self.run, "id", None):
            id_file.write_text(self.run.id + "\n")

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def open_sinks(report_to, run_dir: str | os.PathLike, *, config: dict | None = None, resume_step: int | None = None,
               wandb_project: str = "aimv2", enabled: bool = True) -> list[Sink]:
    """The trackers `report_to` names, opened for RUN (none unless `enabled`: rank 0 only). Raises
    TrackingError naming the package to install when one is missing."""
    names = parse_report_to(report_to)
    if not enabled:
        return []
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sinks: list[Sink] = []
    try:
        for name in names:
            if name == "tensorboard":
                sinks.append(TensorBoardSink(run_dir, resume_step))
            else:
                sinks.append(WandbSink(run_dir, config or {}, wandb_project, resume_step is not None))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return sinks
