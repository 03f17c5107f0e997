"""The `steps` part: the trainer's own step function, train.trainer.train_step (LossModule forward, backward,
clip, one host sync, DecoupledAdamW) on a trainer Run built without a manifest, at AIMv2-L (Table 1 encoder +
the paper's 12 x 1024 decoder), bf16 autocast, fixed 224 px and native resolution (one grid, C patches per
step); fixed-resolution rows step on the real loader's batches when the trainer part built or was given a
manifest, else (and native rows) on synthetic uint8 Batches; prefix attention on FlexAttention vs the SDPA
reference, eager and torch.compile'd: step time, images/s, MFU; the batch halves on out-of-memory; compiled
rows that would not fit in --budget are skipped. Imports neither polars nor webdataset (without a manifest)."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from ..train.metrics import _sync
from .common import Budget, Sizes, reason
from .report import row_line


def bench_run(sizes: Sizes, device: torch.device, native: bool, attention: str, compiled: bool,
              native_dynamic: str = "auto", pad_id: int = 0):
    """A trainer `Run` (train.trainer.Run, what build_run returns) for the steps part, built without a manifest
    or a tokenizer (the GPU machine may lack polars): the model, LossModule, optimiser, schedule and the
    torch.compile'd step as build_run makes them, so the steps part times train_step itself."""
    from ..model.aimv2 import AIMv2
    from ..model.config import model_config
    from ..train.config import TrainConfig
    from ..train.distributed import DistInfo
    from ..train.optim import build_optimizer
    from ..train.presets import resolve
    from ..train.schedule import WarmupCosine
    from ..train.compiling import compile_step
    from ..train.trainer import LossModule, Run, run_precision

    res = None if native else sizes.resolution
    cfg = TrainConfig(manifest="-", tokenizer="-", out="-", model=sizes.model, steps=1000, native_res=native,
                      resolution=res, compile=compiled, compile_dynamic=native_dynamic, attention=attention,
                      device=str(device), batch_size=sizes.batch, batch_patches=sizes.batch_patches, progress=False)
    hp = resolve(sizes.model, "native" if native else "pretrain", cfg.steps, warmup=0)
    torch.manual_seed(0)
    with device:  # initialised where it runs: an L model's init on the host CPU takes seconds per build
        model = AIMv2(model_config(sizes.model, vocab_size=sizes.vocab, pos_embed="sincos" if native else "learned",
                                   img_size=224 if native else sizes.resolution))
    model.set_attention(attention)
    loss_module = LossModule(model, pad_id=pad_id)
    step_fn = loss_module
    if compiled:  # trainer.compile_step's choice of dynamic=; the steps part draws one grid, so one graph
        step_fn = compile_step(loss_module, model, native, native_dynamic, shapes=[sizes.native_grid])
    opt = build_optimizer(model, hp.peak_lr, hp.weight_decay, hp.betas, hp.eps)
    return Run(cfg, DistInfo(), device, "native" if native else "pretrain", run_precision(cfg, device), res, hp,
               model, loss_module, step_fn, opt, WarmupCosine(hp.peak_lr, hp.min_lr, hp.warmup, hp.steps),
               torch.Generator().manual_seed(0), None, False, 0, 1.0,
               params=[p for p in model.parameters() if p.requires_grad], pad_id=pad_id)


def synthetic_batches(B: int, grid: tuple[int, int], sizes: Sizes, device: torch.device, n: int = 2) -> list:
    """n `Batch`es as the loader hands them over (uint8, channels-last, tokens), already on the device."""
    from aimv2data.batch import Batch

    g = torch.Generator().manual_seed(0)
    h, w = grid
    out = []
    for _ in range(n):
        images = torch.randint(0, 256, (B, 14 * h, 14 * w, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
        tokens = torch.randint(1, sizes.vocab, (B, sizes.text_len), generator=g)
        keys = [f"synthetic-{i}" for i in range(B)]
        out.append(Batch(images, grid, 14, [""] * B, keys, ["synthetic"] * B, tokens).to(device))
    return out


def loader_batches(data: dict, sizes: Sizes, device: torch.device, n: int) -> list:
    """n fixed-resolution batches of the real loader (train.trainer.make_loader) on `data`'s manifest, on
    the device: the steps part times the step on them, not the decode (the trainer part times both)."""
    from ..train.config import TrainConfig
    from ..train.distributed import DistInfo
    from ..train.tokenizer import Tokenizer
    from ..train.trainer import make_loader

    cfg = TrainConfig(manifest=data["manifest"], tokenizer=data["tokenizer"], out="-", model=sizes.model,
                      resolution=sizes.resolution, batch_size=sizes.batch, workers=0, progress=False)
    loader = make_loader(cfg, Tokenizer(data["tokenizer"]), DistInfo(), sizes.resolution, 14)
    out = []
    while len(out) < n:
        got = [b.to(device) for b, _ in zip(loader, range(n - len(out)))]
        if not got:
            raise ValueError(f"{data['manifest']}: fewer samples than one batch of {sizes.batch}")
        out += got
    return out


def time_steps(run, batches: list, steps: int, warmup: int) -> list[float]:
    """Seconds of each timed `train.trainer.train_step` (the trainer's own step: autocast forward, backward,
    clip, one host sync, DecoupledAdamW) over `batches`, cycled."""
    from ..train import trainer
    from ..train.preempt import StopRequest

    stop = StopRequest()
    times = []
    try:
        for i in range(warmup + steps):
            _sync(run.device)
            t0 = time.perf_counter()
            trainer.train_step(run, batches[i % len(batches)], stop)  # raises StepFailed on a non-finite loss
            _sync(run.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    finally:
        stop.restore()
    return times


def _step_config(sizes: Sizes, device: torch.device, res: str, attention: str, compiled: bool, peak: float,
                 native_dynamic: str = "auto", data: dict | None = None) -> dict:
    from ..model.flops import step_flops
    from ..train.metrics import mfu
    from ..train.compiling import compile_dynamic

    native = res == "native"
    grid = sizes.native_grid if native else (sizes.resolution // 14,) * 2
    B = max(1, sizes.batch_patches // (grid[0] * grid[1])) if native else sizes.batch
    row = {"resolution": res, "grid": list(grid), "attention": attention, "compile": compiled}
    # as the trainer's --compile-dynamic (train.trainer.compile_step): auto is static on CUDA
    if compiled and native:
        row["dynamic"] = compile_dynamic(native_dynamic)
    use_loader = data is not None and not native
    row["batches"] = "loader" if use_loader else "synthetic"
    if use_loader:  # the model must embed every id of the loader's tokenizer (the dry run's vocabulary is tiny)
        from ..train.tokenizer import Tokenizer

        sizes = replace(sizes, vocab=max(sizes.vocab, Tokenizer(data["tokenizer"]).vocab_size))
    while True:
        run = bench_run(sizes, device, native, attention, compiled, native_dynamic)
        try:
            batches = (loader_batches(data, replace(sizes, batch=B), device, 2) if use_loader
                       else synthetic_batches(B, grid, sizes, device))
            t_first = time.perf_counter()
            times = time_steps(run, batches, sizes.steps, sizes.warmup)
            warm_s = time.perf_counter() - t_first - sum(times)
            break
        except torch.OutOfMemoryError:
            del run
            batches = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if B == 1:
                raise
            row.setdefault("oom_at_batch", []).append(B)
            B //= 2
    dt = sorted(times)[len(times) // 2]
    flops = step_flops(run.model.cfg, grid, B, sizes.text_len).train
    row.update(batch=B, precision=run.precision, step_ms=1e3 * dt, images_per_s=B / dt, mfu=mfu(flops, dt, peak),
               warmup_s=warm_s, steps=len(times), step_function="train.trainer.train_step")
    if device.type == "cuda":
        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    del run, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def part_steps(device: torch.device, sizes: Sizes, ctx: dict, budget: Budget, dry_run: bool,
               rows_wanted: tuple[str, ...] = (), native_dynamic: str = "auto", **_) -> dict:
    """Eager rows first (cheap), compiled rows while the budget allows (each compiles the whole step). MFU is
    the trainer's (train.metrics.mfu over reference_peak: the datasheet's bf16 peak on known GPUs), so the two
    compare; the matmul part's measured peak is reported beside it."""
    from ..train.metrics import reference_peak

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak, peak_source = reference_peak(device, dtype)
    rows = []
    for compiled in (False, True):
        for res in ("fixed", "native"):
            for attention in ("flex", "sdpa"):
                base = {"resolution": res, "attention": attention, "compile": compiled}
                if rows_wanted and _row_key(res, attention, compiled) not in rows_wanted:
                    continue
                if attention == "flex" and device.type != "cuda":
                    rows.append({**base, "status": "skipped",
                                 "reason": "FlexAttention has no backward on CPU (the GPU check runs it)"})
                    continue
                if compiled and dry_run:
                    rows.append({**base, "status": "skipped", "reason": "dry run: torch.compile of the step is "
                                 "exercised on CPU by tests/test_model_arch.py and test_model_attention.py"})
                    continue
                need = 100 if compiled else 15
                if device.type == "cuda" and budget.left() < need + 60:
                    rows.append({**base, "status": "skipped", "reason": f"time budget: {budget.left():.0f} s left"})
                    continue
                try:
                    rows.append({**_step_config(sizes, device, res, attention, compiled, peak, native_dynamic,
                                                 data=ctx.get("data")),
                                 "status": "ok"})
                except Exception as e:
                    rows.append({**base, "status": "error", "reason": reason(e)})
                print(f"  steps: {row_line(rows[-1])}", flush=True)
    return {"rows": rows, "peak_tflops": peak / 1e12, "peak_source": peak_source,
            "measured_peak_tflops": (ctx.get("peak") or 0.0) / 1e12}


def _row_key(res: str, attention: str, compiled: bool) -> str:
    return f"{res}-{attention}-{'compiled' if compiled else 'eager'}"
