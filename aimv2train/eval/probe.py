"""Frozen-trunk probing (`aimv2 probe`), the paper's yardstick (§4.1, appendix Table A2).

The encoder is frozen, so its tokens are computed once and cached (probe_data.py). On them two probes
are trained, each over the whole learning-rate x weight-decay grid at once (one head per setting, one
pass over the data per step, every head in its own optimiser group):

  attentive  AIMv1's attention-pooling classifier: the frozen tokens are standardised per channel
             (BatchNorm without affine, in its inference form, with the training set's exact statistics:
             the trunk is frozen, so they are fixed), a learned query attends over them (k, v
             projections, multi-head), the pooled vector goes through a linear head.
  linear     a linear head on the standardised mean of the tokens (GAP, the paper's Table C3 linear probe).

Optimisation as Table A2: PyTorch's AdamW, betas (0.9, 0.999), peak lr grid
[5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3], weight decay [0.05, 0.1], cosine decay to 1e-5 after a
linear warmup, gradient clipping 3.0 (per head), 100 epochs, batch 1024. Weight decay applies to the
matrices and the query, not to biases. Every head starts from the same weights (one seed) and sees the
same batches, so settings differ only in lr and wd. Reported: top-1 on the validation set after the
last epoch, per setting, and the best setting.

Table A2's augmentations (RandomResizedCrop, flip, colour jitter, RandAugment) change the pixels every
epoch and so need the trunk run every epoch; with cached features they are left out.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from aimv2data.atomic import atomic_torch_save, write_json_atomic
from aimv2data.paper import EVAL_MAX_PATCHES
from ..train.schedule import WarmupCosine

# Table A2 (appendix; "Table B2" in the arXiv v2 appendix): the attentive-probe hyperparameters.
TABLE_A2 = {
    "optimizer": "PyTorch AdamW",
    "betas": (0.9, 0.999),
    "lrs": (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 2e-3),
    "min_lr": 1e-5,
    "wds": (0.05, 0.1),
    "batch_size": 1024,  # the table lists "1024 512" (two columns, not said which is which)
    "clip": 3.0,
    "warmup_epochs": 5,  # the table lists "5 0"
    "epochs": 100,
    "schedule": "cosine decay",
}


@dataclass
class ProbeConfig:
    lrs: tuple[float, ...] = TABLE_A2["lrs"]
    wds: tuple[float, ...] = TABLE_A2["wds"]
    epochs: int = TABLE_A2["epochs"]
    batch_size: int = TABLE_A2["batch_size"]
    warmup_epochs: int = TABLE_A2["warmup_epochs"]
    min_lr: float = TABLE_A2["min_lr"]
    clip: float = TABLE_A2["clip"]
    betas: tuple[float, float] = TABLE_A2["betas"]
    heads: int | None = None  # attention heads of the probe; None: the encoder's
    queries: int = 1
    linear: bool = True
    seed: int = 0

    def __post_init__(self):
        self.lrs, self.wds = tuple(float(x) for x in self.lrs), tuple(float(x) for x in self.wds)
        if not self.lrs or not self.wds:
            raise ValueError("the sweep needs at least one learning rate and one weight decay")
        if any(x <= 0 for x in self.lrs) or any(x < 0 for x in self.wds):
            raise ValueError(f"learning rates must be > 0 and weight decays >= 0, got {self.lrs}, {self.wds}")
        if self.epochs < 1 or self.batch_size < 1 or self.warmup_epochs < 0 or self.queries < 1:
            raise ValueError("epochs, batch size and queries must be >= 1, warmup epochs >= 0")

    def settings(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.wds]


# ------------------------------------------------------------------------------------------ the heads

class Standardize(nn.Module):
    """(x - mean) / sqrt(var + eps) per channel with fixed statistics: BatchNorm1d(affine=False, eps=1e-6)
    as it runs at inference, with the exact statistics of the frozen training features."""

    def __init__(self, mean: np.ndarray, var: np.ndarray, eps: float = 1e-6):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("inv_std", torch.as_tensor(1.0 / np.sqrt(var + eps), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.inv_std


class AttentionPoolingHead(nn.Module):
    """Learned queries attend over the tokens through k and v projections (no biases), heads averaged
    over queries, then a linear classifier:

        a_h = softmax((W_k x)_h . q_h / sqrt(d_h))   over the tokens (padding masked out)
        z   = concat_h sum_i a_h,i (W_v x_i)_h ;  logits = W z + b

    Computed in the algebraically equal order that never projects every token: (W_k x)_h . q_h =
    x . (W_k,h^T q_h) and sum_i a_i W_v x_i = W_v (sum_i a_i x_i). Per image that is O(N D) instead of
    O(N D^2), which matters when a whole lr x wd grid of heads trains at once. Same parameters, same
    gradients (tests/test_probe.py checks it against torch SDPA over projected tokens)."""

    def __init__(self, dim: int, num_classes: int, heads: int, queries: int = 1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"probe heads {heads} do not divide the feature width {dim}")
        self.heads, self.queries = heads, queries
        self.query = nn.Parameter(torch.randn(1, queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes)
        for lin in (self.k, self.v, self.linear):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.linear.bias)

    def pool(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) standardised tokens, mask (B, N) True for real tokens -> pooled (B, D)."""
        B, N, D = x.shape
        H, Q, dh = self.heads, self.queries, D // self.heads
        q = self.query[0].view(Q, H, dh)
        u = torch.einsum("qhd,hdc->hqc", q, self.k.weight.view(H, dh, D)) * dh ** -0.5  # W_k,h^T q_h
        logits = torch.einsum("bnc,hqc->bhqn", x, u)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        xa = torch.einsum("bhqn,bnc->bhqc", logits.softmax(-1), x)  # attention-weighted tokens, per head
        z = torch.einsum("bhqc,hdc->bqhd", xa, self.v.weight.view(H, dh, D)).reshape(B, Q, D)
        return z.mean(1)

    def pool_sdpa(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The same pooling in its textbook order: project every token to k and v, then torch SDPA with
        the learned queries. The reference `pool` is tested and benchmarked against."""
        B, N, D = x.shape
        H, Q = self.heads, self.queries
        q = self.query.expand(B, -1, -1).view(B, Q, H, D // H).transpose(1, 2)
        k = self.k(x).view(B, N, H, D // H).transpose(1, 2)
        v = self.v(x).view(B, N, H, D // H).transpose(1, 2)
        m = None if mask is None else mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(B, Q, D).mean(1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(self.pool(x, mask))


class LinearHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.xavier_uniform_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x)


# ------------------------------------------------------------------------------------------ the sweep

@dataclass
class SweepData:
    """What a sweep trains and evaluates on: batch(idx) -> (x, mask) for train and val, and labels."""
    train_batch: object
    train_labels: np.ndarray
    val_batch: object
    val_labels: np.ndarray


@dataclass
class SweepResult:
    kind: str
    results: list[dict] = field(default_factory=list)  # per setting: lr, wd, top1, train_loss, diverged
    best: dict | None = None
    seconds: float = 0.0
    resumed_from_epoch: int = 0



def train_sweep(kind: str, make_head, norm: nn.Module, data: SweepData, cfg: ProbeConfig, *, device="cpu",
                state_path: Path | None = None, save_every_s: float = 60.0, progress: bool = True) -> SweepResult:
    """Train one head per (lr, wd) of `cfg` together and report each one's validation top-1.

    With `state_path`, the sweep is checkpointed at epoch ends (at most every `save_every_s` seconds) and
    resumed from there; the epoch's data order depends only on (seed, epoch), so a resumed sweep is the
    same sweep. The file is removed when the sweep ends."""
    t0 = time.perf_counter()
    settings = cfg.settings()
    heads = _same_start_heads(make_head, len(settings), cfg.seed).to(device)
    norm = norm.to(device)
    opt = _sweep_optimizer(heads, settings, cfg.betas)
    n = len(data.train_labels)
    bs = min(cfg.batch_size, n)
    per_epoch = math.ceil(n / bs)
    total = cfg.epochs * per_epoch
    warmup = min(cfg.warmup_epochs * per_epoch, total)
    scheds = [WarmupCosine(lr, min(cfg.min_lr, lr), warmup, total) for lr, _ in settings]
    start, diverged, last_loss = _resume_sweep(state_path, heads, opt, len(settings))
    labels = torch.from_numpy(data.train_labels)
    bar = tqdm(total=total, initial=start * per_epoch, desc=f"{kind} probe x{len(settings)}", unit="step",
               disable=not progress, dynamic_ncols=True)
    last_save = time.perf_counter()
    heads.train()
    for epoch in range(start, cfg.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).numpy()
        sums = [0.0] * len(settings)
        for b in range(per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            x, mask = data.train_batch(idx)
            x = norm(x.to(device))
            mask = mask.to(device) if mask is not None else None
            y = labels[idx].to(device)
            step = epoch * per_epoch + b
            for i, sched in enumerate(scheds):
                opt.param_groups[2 * i]["lr"] = opt.param_groups[2 * i + 1]["lr"] = sched.lr(step)
            _sweep_step(heads, opt, x, mask, y, diverged, sums, cfg.clip)
            bar.update(1)
        last_loss = [s / n if not d else math.nan for s, d in zip(sums, diverged)]
        if state_path is not None and epoch + 1 < cfg.epochs and time.perf_counter() - last_save >= save_every_s:
            atomic_torch_save({"heads": heads.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1,
                          "diverged": diverged, "last_loss": last_loss}, state_path)
            last_save = time.perf_counter()
    bar.close()
    top1 = evaluate(heads, norm, data.val_batch, data.val_labels, cfg.batch_size, device)
    out = _sweep_result(kind, settings, top1, last_loss, diverged, start)
    out.seconds = time.perf_counter() - t0
    if state_path is not None and state_path.is_file():
        state_path.unlink()
    return out


def _same_start_heads(make_head, count: int, seed: int) -> nn.ModuleList:
    """`count` heads from `make_head`, all with the same initial weights: settings differ only in lr, wd."""
    heads = nn.ModuleList()
    for _ in range(count):
        torch.manual_seed(seed)
        heads.append(make_head())
    return heads


def _sweep_optimizer(heads: nn.ModuleList, settings, betas) -> torch.optim.AdamW:
    """One AdamW over every head, two groups per head (2i: its matrices and query, decayed; 2i + 1: its
    biases and the rest, not decayed), so the loop sets head i's lr on groups 2i and 2i + 1."""
    groups = []
    for head, (lr, wd) in zip(heads, settings):
        decay = [p for p in head.parameters() if p.ndim >= 2]
        rest = [p for p in head.parameters() if p.ndim < 2]
        groups += [{"params": decay, "lr": lr, "weight_decay": wd}, {"params": rest, "lr": lr, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, betas=betas)


def _resume_sweep(state_path: Path | None, heads: nn.ModuleList, opt, count: int):
    """(first epoch, diverged, last_loss): from the sweep's checkpoint when there is one (loading the heads'
    and optimiser's state into `heads` and `opt`), else a fresh start."""
    if state_path is None or not state_path.is_file():
        return 0, [False] * count, [math.nan] * count
    st = torch.load(state_path, map_location="cpu", weights_only=True)
    heads.load_state_dict(st["heads"])
    opt.load_state_dict(st["opt"])
    return int(st["epoch"]), list(st["diverged"]), list(st["last_loss"])


def _sweep_step(heads: nn.ModuleList, opt, x, mask, y, diverged: list, sums: list, clip: float) -> None:
    """One optimiser step of every head not diverged, adding each one's batch loss (x batch size) to `sums`.
    A head whose loss or gradient norm is not finite is marked in `diverged` and trains no more."""
    active = [i for i in range(len(heads)) if not diverged[i]]
    if active:
        losses = torch.stack([F.cross_entropy(heads[i](x, mask), y) for i in active])
        losses.sum().backward()  # the heads share no parameters: each gets its own gradient
        norms = torch.stack([torch.nn.utils.clip_grad_norm_(heads[i].parameters(), clip) for i in active])
        finite = (torch.isfinite(losses) & torch.isfinite(norms)).tolist()  # one device sync per step
        for i, ok, loss in zip(active, finite, losses.detach().cpu().tolist()):
            if ok:
                sums[i] += loss * len(y)
            else:  # this setting diverged: stop training it, the others go on
                diverged[i] = True
                for p in heads[i].parameters():
                    p.grad = None
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sweep_result(kind: str, settings, top1, last_loss, diverged, start: int) -> SweepResult:
    out = SweepResult(kind, resumed_from_epoch=start)
    for (lr, wd), acc, loss, div in zip(settings, top1, last_loss, diverged):
        out.results.append({"lr": lr, "wd": wd, "top1": None if div else acc,
                            "train_loss": None if div else loss, "diverged": div})
    ok = [r for r in out.results if not r["diverged"]]
    out.best = max(ok, key=lambda r: r["top1"]) if ok else None  # ties: the first (smaller lr, wd)
    return out


@torch.no_grad()
def evaluate(heads: nn.ModuleList, norm: nn.Module, batch_fn, labels: np.ndarray, batch_size: int,
             device="cpu") -> list[float]:
    """Top-1 accuracy (percent) of every head on the set behind `batch_fn`."""
    heads.eval()
    correct = torch.zeros(len(heads), dtype=torch.long)
    y_all = torch.from_numpy(labels)
    for s in range(0, len(labels), batch_size):
        idx = np.arange(s, min(s + batch_size, len(labels)))
        x, mask = batch_fn(idx)
        x = norm(x.to(device))
        mask = mask.to(device) if mask is not None else None
        y = y_all[idx].to(device)
        for i, head in enumerate(heads):
            correct[i] += (head(x, mask).argmax(-1) == y).sum().cpu()
    heads.train()
    return (100.0 * correct.double() / max(1, len(labels))).tolist()


# ------------------------------------------------------------------------------------------ the command

@dataclass
class ProbeJob:
    checkpoint: str
    train: str
    val: str
    resolution: int | None = None   # None with native_res False: the encoder's own img_size (or native for sin-cos)
    native_res: bool = False
    max_patches: int = EVAL_MAX_PATCHES  # native resolution: patch budget per image (as `aimv2 embed`)
    label_col: str = "label"
    cache_dir: str | None = None    # None: $XDG_CACHE_HOME/aimv2/probe (~/.cache/aimv2/probe)
    cache_dtype: str = "float16"
    encode_batch_size: int = 64
    workers: int = 0
    device: str | None = None
    heads_for_bare: int | None = None  # only for bare state dicts whose width is not a multiple of 128
    progress: bool = True


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "aimv2" / "probe"


def run_probe(job: ProbeJob, cfg: ProbeConfig, log=print) -> dict:
    """Encode (or find cached) train and val features, run the sweeps, return the results dict."""
    from .weights import read_encoder, resolve_weights
    from .probe_data import Features, Preprocess, encoder_hash, open_dataset

    t0 = time.perf_counter()
    if job.resolution is not None and job.native_res:
        raise ValueError("--resolution and --native-res are exclusive: pick one")
    weights, _ = resolve_weights(job.checkpoint, notify=log)  # a run directory -> its newest intact checkpoint
    encoder = read_encoder(weights, job.heads_for_bare)
    ecfg = encoder.cfg
    device = job.device or ("cuda" if torch.cuda.is_available() else "cpu")
    native = job.native_res or (job.resolution is None and ecfg.pos_embed == "sincos")
    prep = Preprocess(resolution=None if native else (job.resolution or ecfg.img_size),
                      max_patches=job.max_patches if native else None, patch_size=ecfg.patch_size)
    train_set = open_dataset(job.train, job.label_col)
    val_set = open_dataset(job.val, job.label_col, classes=train_set.classes)
    if len(train_set.classes) < 2:
        raise ValueError(f"{job.train}: a probe needs at least 2 classes, found {train_set.classes}")
    enc_hash = encoder_hash(encoder)
    cache_root = Path(job.cache_dir) if job.cache_dir else default_cache_dir()
    log(f"encoder {ecfg.dim}x{ecfg.depth} ({ecfg.pos_embed} positions) from {weights}, sha256 "
        f"{enc_hash[:12]}; {prep.describe()}; {device}; cache {cache_root}")
    reports = _encode_splits(encoder, {"train": train_set, "val": val_set}, cache_root, prep, enc_hash, device,
                             job, weights, log)
    del encoder  # the sweeps need only the cached features: free the trunk's memory first
    ftr, fva = Features(reports["train"].cache), Features(reports["val"].cache)
    C = len(train_set.classes)
    heads = cfg.heads or ecfg.heads
    sweeps = _run_sweeps(ftr, fva, C, heads, cfg, device, job.progress)

    val_counts = np.bincount(fva.labels, minlength=C)
    return {
        "checkpoint": str(weights),
        "encoder": {**asdict(ecfg), "sha256": enc_hash},
        "preprocess": {"mode": "native" if native else "fixed", "resolution": prep.resolution,
                       "max_patches": prep.max_patches},
        "train": _split_doc(job.train, train_set, ftr),
        "val": _split_doc(job.val, val_set, fva),
        "classes": train_set.classes,
        "chance_top1": 100.0 / C,
        "majority_top1": 100.0 * float(val_counts.max()) / len(fva),
        "config": {**asdict(cfg), "heads": heads, "augmentations": "none (cached features)"},
        **{kind: {"best": s.best, "results": s.results, "seconds": round(s.seconds, 2),
                  "resumed_from_epoch": s.resumed_from_epoch} for kind, s in sweeps.items()},
        "cache": {"train": str(ftr.cache), "val": str(fva.cache)},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _encode_splits(encoder, splits: dict, cache_root: Path, prep, enc_hash: str, device: str, job: ProbeJob,
                   weights, log) -> dict:
    """Per split, its features encoded into (or found in) the cache under `cache_root`: split -> encode report."""
    from .probe_data import encode

    reports = {}
    for split, ds in splits.items():
        rep = encode(encoder, ds, cache_root, prep, enc_hash=enc_hash, batch_size=job.encode_batch_size,
                     device=device, workers=job.workers, dtype=job.cache_dtype, progress=job.progress,
                     describe={"checkpoint": str(weights), "split": split})
        reports[split] = rep
        log(f"{split}: {rep.images} images, {len(ds.classes)} classes, "
            + (f"encoded {rep.encoded_now} in {rep.seconds:.1f}s" if rep.encoded_now else "features from the cache")
            + (f", {len(rep.skipped)} unreadable skipped" if rep.skipped else ""))
    return reports


def _run_sweeps(ftr, fva, C: int, heads: int, cfg: ProbeConfig, device: str, progress: bool) -> dict:
    """The attentive sweep on the tokens and, with `cfg.linear`, the linear one on their mean: kind -> result.
    Each sweep's checkpoint is named by the config and the val cache, so another sweep never resumes it."""
    sweeps = {}
    key = hashlib.sha256(json.dumps([asdict(cfg), str(fva.cache)], default=str).encode()).hexdigest()[:16]
    (ftr.cache / "sweeps").mkdir(exist_ok=True)
    mean, var = ftr.token_stats()
    sweeps["attentive"] = train_sweep(
        "attentive", lambda: AttentionPoolingHead(ftr.dim, C, heads, cfg.queries), Standardize(mean, var),
        SweepData(ftr.batch, ftr.labels, fva.batch, fva.labels), cfg, device=device,
        state_path=ftr.cache / "sweeps" / f"attentive_{key}.pt", progress=progress)
    if cfg.linear:
        pooled_tr, pooled_va = torch.from_numpy(ftr.pooled), torch.from_numpy(fva.pooled)
        sweeps["linear"] = train_sweep(
            "linear", lambda: LinearHead(ftr.dim, C),
            Standardize(ftr.pooled.astype(np.float64).mean(0), ftr.pooled.astype(np.float64).var(0)),
            SweepData(lambda i: (pooled_tr[i], None), ftr.labels, lambda i: (pooled_va[i], None), fva.labels),
            cfg, device=device, state_path=ftr.cache / "sweeps" / f"linear_{key}.pt", progress=progress)
    return sweeps


def _split_doc(path, ds, feats) -> dict:
    return {"path": str(path), "kind": ds.kind, "images": len(feats), "skipped": feats.skipped,
            "dropped": [{"name": n, "reason": r} for n, r in ds.dropped], "tokens_per_image":
            int(feats.lengths[0]) if feats.uniform else [int(feats.lengths.min()), int(feats.lengths.max())]}


def write_results(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    write_json_atomic(results, path)
    return path
