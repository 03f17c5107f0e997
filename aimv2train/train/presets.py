"""Pre-training hyper-parameters as data, and how a short run scales them down.

PAPER is Table A1 of the AIMv2 paper ("Pre-training hyperparameters"; numbered B1 in some versions of
the paper): fully decoupled AdamW, b = (0.9, 0.95), peak lr L/H/1B/3B = 1e-3/8e-4/8e-4/4e-4, min lr
1e-5, weight decay 1e-4, batch 8192, patch 14, gradient clipping 1.0, 12.5k warmup iterations, 1.5M
iterations, cosine decay; RandomResizedCrop 224 px, scale [0.4, 1.0], ratio [0.75, 1.33], bicubic,
horizontal flip p = 0.5. The sizes the table does not have (tiny, B) are our choice, marked as such.

Small-run rule (`resolve`): the run's length is `--steps`; warmup = min(12.5k, round(5% of steps)),
at least 1 step; lr, min lr, betas, weight decay and clipping stay as in the table (AdamW's step size
does not depend on the batch size, so the lr is not rescaled for small batches: pass --lr to change
it). Every value can be overridden from the command line.

Stages (paper §2.4 and "High-resolution Adaptation"):
  pretrain  224 px, RandomResizedCrop, learned position table;
  highres   336 (or 448) px, weight decay 0 ("important for maintaining stable optimization"),
            `--init` from a pre-trained checkpoint / imported weights, the learned table resampled
            bicubically to the new grid;
  native    `--native-res` (area-sampled constant patch budget), 2D sin-cos positions, `--init` from a
            fixed-resolution checkpoint (its learned table is dropped).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model.config import preset_name


@dataclass(frozen=True)
class OptimPreset:
    peak_lr: float
    min_lr: float = 1e-5
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8  # not in the table: torch's default
    clip: float = 1.0
    warmup: int = 12_500
    total_steps: int = 1_500_000
    batch_size: int = 8192
    source: str = "Table A1"


PAPER: dict[str, OptimPreset] = {
    "L": OptimPreset(peak_lr=1e-3),
    "H": OptimPreset(peak_lr=8e-4),
    "1B": OptimPreset(peak_lr=8e-4),
    "3B": OptimPreset(peak_lr=4e-4),
    # not in Table A1: the smaller sizes take L's rate
    "B": OptimPreset(peak_lr=1e-3, source="ours (L's values)"),
    "tiny": OptimPreset(peak_lr=1e-3, source="ours (L's values)"),
}

# Table A1's augmentations (RandomResizedCrop, flip) are the loader's defaults: aimv2data/paper.py
WARMUP_FRACTION = 0.05


@dataclass(frozen=True)
class Stage:
    name: str
    resolution: int | None  # fixed-res default (None: native resolution)
    native: bool
    pos_embed: str  # "learned" | "sincos"
    weight_decay: float | None  # None: the preset's
    needs_init: bool


STAGES: dict[str, Stage] = {
    "pretrain": Stage("pretrain", 224, False, "learned", None, False),
    "highres": Stage("highres", 336, False, "learned", 0.0, True),
    "native": Stage("native", None, True, "sincos", None, True),
}


@dataclass(frozen=True)
class HParams:
    """What the trainer uses, after the small-run rule and the command-line overrides."""
    peak_lr: float
    min_lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    clip: float
    warmup: int
    steps: int
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def scaled_warmup(steps: int, paper_warmup: int = 12_500, fraction: float = WARMUP_FRACTION) -> int:
    """min(paper warmup, 5% of the run), at least one step."""
    return max(1, min(paper_warmup, round(fraction * steps)))


def resolve(model: str, stage: str, steps: int, *, lr: float | None = None, min_lr: float | None = None,
            weight_decay: float | None = None, warmup: int | None = None, clip: float | None = None,
            betas: tuple[float, float] | None = None) -> HParams:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    p = PAPER[preset_name(model)]
    st = STAGES[stage]
    wd = weight_decay if weight_decay is not None else (st.weight_decay if st.weight_decay is not None
                                                        else p.weight_decay)
    peak = lr if lr is not None else p.peak_lr
    h = HParams(peak_lr=peak, min_lr=min(min_lr if min_lr is not None else p.min_lr, peak),
                weight_decay=wd, betas=tuple(betas or p.betas), eps=p.eps,
                clip=clip if clip is not None else p.clip,
                warmup=warmup if warmup is not None else scaled_warmup(steps, p.warmup), steps=steps,
                source=p.source)
    if h.warmup > steps:
        raise ValueError(f"--warmup {h.warmup} is longer than the run (--steps {steps})")
    return h
