"""Training curves from RUN/metrics.jsonl as PNGs (matplotlib, Agg: no display needed).

One figure per quantity, every run given drawn on the same axes: loss.png (the total and each of the
model's LOSS_TERMS; the held-out `val_*` losses of `--val-manifest`, where logged, dashed with markers),
lr.png, grad_norm.png and throughput.png (images/s and MFU).
"""
from __future__ import annotations

import os
from pathlib import Path

from aimv2data.atomic import atomic_write

from ..model.aimv2 import LOSS_TERMS, TOTAL_LOSS
from .metrics import read_metrics

FIGURES = {
    "loss": [(TOTAL_LOSS, "total"), *((k, label) for k, (_, label) in LOSS_TERMS.items()),
             (f"val_{TOTAL_LOSS}", "val total"), *((f"val_{k}", f"val {short}") for k, (short, _) in LOSS_TERMS.items())],
    "lr": [("lr", "learning rate")],
    "grad_norm": [("grad_norm", "gradient norm (before clipping)")],
    "throughput": [("images_per_s", "images/s"), ("mfu", "MFU")],
}


def ema(values: list[float], beta: float) -> list[float]:
    """Debiased exponential moving average (beta = 0: the raw values)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i) if beta > 0 else v)
    return out


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))


def plot_runs(runs: list[str | os.PathLike], out: str | os.PathLike | None = None,
              smooth: float = 0.0) -> list[Path]:
    """Write the PNGs to `out` (default: the first run's directory); return their paths."""
    figures = make_figures(runs, smooth)  # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    out = Path(out) if out is not None else Path(runs[0])
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    return written


def make_figures(runs: list[str | os.PathLike], smooth: float = 0.0) -> dict:
    """name -> matplotlib Figure, one per entry of FIGURES."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0 <= smooth < 1:
        raise ValueError(f"--smooth must be in [0, 1), got {smooth}")
    data = {str(r): read_metrics(r) for r in runs}
    empty = [r for r, recs in data.items() if not recs]
    if empty:
        raise ValueError(f"no steps logged yet in {', '.join(empty)}")
    figures, colors = {}, {}
    for name, series in FIGURES.items():
        fig, axes = plt.subplots(1, 2 if name == "throughput" else 1, figsize=(11 if name == "throughput" else 7, 4),
                                 squeeze=False)
        for run, recs in data.items():
            label_run = Path(run).name if len(data) > 1 else ""
            for i, (key, label) in enumerate(series):
                ax = axes[0][i if name == "throughput" else 0]
                have = [r for r in recs if key in r]  # val_* only on the steps validation ran
                if not have:
                    continue
                steps = [r["step"] for r in have]
                ys = ema([float(r[key]) for r in have], 0.0 if name == "lr" else smooth)
                style = {}
                if key.startswith("val_"):  # dashed, in the colour of its training curve
                    style = dict(linestyle="--", marker="o", markersize=3, color=colors.get((run, key[4:])))
                (line,) = ax.plot(steps, ys, label=" ".join(x for x in (label_run, label) if x), linewidth=1.2,
                                  **style)
                colors[(run, key)] = line.get_color()
                ax.set_xlabel("step")
                ax.set_ylabel(label if name != "loss" else "loss")
                if name == "grad_norm" or (name == "loss" and min(ys) > 0):
                    ax.set_yscale("log")
                ax.grid(alpha=0.3)
        for ax in axes[0]:
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(f"{name}" + (f" (EMA {smooth})" if smooth and name != "lr" else ""))
        figures[name] = fig
    return figures
