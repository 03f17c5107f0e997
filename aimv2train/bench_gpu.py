"""`aimv2 bench gpu`: the one prepared GPU check (issue 15), a single command that finishes in about
8 minutes on one H100, writes one JSON file and prints a table.

    python -m aimv2train.bench_gpu --out bench_gpu.json            # on the GPU machine (no click needed)
    python -m aimv2train.bench_gpu --dry-run --out dry.json        # tiny sizes on CPU, same code path
    aimv2 bench gpu [--dry-run] ...                                # the same through the CLI

Parts, each on its own and in this order (a part that fails or cannot run is recorded with its reason,
the rest go on; the JSON is rewritten after every part, so a run cut short keeps what it measured):
  env         torch / CUDA / GPU / CPU, what is importable (DALI, polars, webdataset)
  peak        the best bf16 FLOP/s of one large matmul (beside MFU, whose denominator is the trainer's
              train.metrics.reference_peak)
  parity      the same weights and batch on CUDA and on CPU in fp32 (TF32 off): encoder tokens and both
              losses, and on CUDA the gradients of the flex path against the SDPA path (CPU cannot run
              FlexAttention's backward)
  decode      DALI "mixed" (nvJPEG) decode + crop + resize images/s at fixed 224 and native resolution on
              generated 1-3 MP baseline JPEGs, and the `pil` decoder on all host cores (threads) on the same
              files; DALI skipped with a line saying so when it is not importable
  trainer     a few steps of the real trainer (`aimv2 train`'s train()) on a small generated manifest,
              when polars (the manifest side) is importable
  steps       the trainer's own step function, train.trainer.train_step (LossModule forward, backward, clip,
              one host sync, DecoupledAdamW) on a trainer Run built without a manifest, at AIMv2-L (Table 1
              encoder + the paper's 12 x 1024 decoder), bf16 autocast, fixed 224 px and native resolution
              (one grid, C patches per step); fixed-resolution rows step on the real loader's batches when the
              trainer part built or was given a manifest, else (and native rows) on synthetic uint8 Batches;
              prefix attention on FlexAttention vs the SDPA reference,
              eager and torch.compile'd: step time, images/s, MFU; the batch halves on out-of-memory;
              compiled rows that would not fit in --budget are skipped
The model and decode parts import neither polars nor webdataset (the GPU machine has neither).

Bringing DALI to a machine that cannot download (rehearsed on CPU, every step: scripts/dali_chunks.sh,
tests/test_dali_chunks.py, and once by hand on the real wheels, benchmarks/RESULTS.md "GPU check").
The wheel nvidia-dali-cuda130 2.4.0 is 199 MB, and `--no-deps` alone is NOT enough: `import nvidia.dali`
then fails on optree, and decoding needs nvidia-nvimgcodec-cu13, nvjpeg and libnvcomp. With its
dependencies (numpy left out: the machine has its own) it is 17 wheels, 257 MB: five chunks of 60 MiB,
one per call, each call carrying about 61 MB of the 64 MiB allowed beside a ~1 MB working tree.
  here:  pip download nvidia-dali-cuda130==2.4.0 -d /tmp/dali312 --only-binary=:all: --python-version 3.12 \
             --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
             --platform manylinux_2_17_x86_64          # the GPU machine runs CPython 3.12
         rm /tmp/dali312/numpy-*.whl
         scripts/dali_chunks.sh split /tmp/dali312 .dali 60M   # .dali/dali312.tar.part00..04 + SHA256SUMS*
         echo /.dali/ >> .git/info/exclude                    # an ignored path, so it travels only when carried
  call k = 0..4, back to back on the same warm machine (it is given back ~30 s after a call, and /tmp
  goes with it), carry [".dali/dali312.tar.part0k", ".dali/SHA256SUMS", ".dali/SHA256SUMS.parts"]:
         mkdir -p /tmp/dali && cp .dali/* /tmp/dali/
  the last call (k = 4) then goes on:
         scripts/dali_chunks.sh join /tmp/dali /tmp/dali       # checks every part, cats them, sha256sum -c
         PYTHON=python scripts/dali_chunks.sh install /tmp/dali/dali312.tar /tmp/dalipkg   # pip --no-deps --target
         PYTHONPATH=/tmp/dalipkg:$PYTHONPATH python -m aimv2train.bench_gpu --out $OUT/bench_gpu.json
DALI for CUDA 13 needs a driver that supports CUDA 13 (nvidia-smi's "CUDA Version" >= 13.0); with an older
driver, download nvidia-dali-cuda120 (and its -cu12 dependencies) instead. The five transfer calls cost
device time (each start of a call is minutes on a cold machine): with a 15-minute window, run the check
without DALI first unless the window is known to allow both.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .train.distributed import affinity_cpus
from .train.metrics import _sync

# cheap parts first; the steps (whose compiled rows take most of the time) use what is left of the budget
PARTS = ("env", "peak", "parity", "decode", "trainer", "steps")


@dataclass
class Sizes:
    """What one run measures: the real sizes on a GPU, tiny ones for --dry-run on CPU."""
    model: str
    batch: int               # fixed resolution, per step (halved on OOM)
    resolution: int
    native_grid: tuple[int, int]
    batch_patches: int       # native resolution: C; batch = C // (h*w)
    text_len: int
    vocab: int
    steps: int               # timed steps per configuration
    warmup: int
    parity_batch: int
    jpegs: int
    native_decode: tuple[int, int]  # (w, h) of the native-resolution decode output
    trainer_steps: int


GPU_SIZES = Sizes(model="L", batch=128, resolution=224, native_grid=(23, 37), batch_patches=32768, text_len=77,
                  vocab=32000, steps=10, warmup=3, parity_batch=2, jpegs=128, native_decode=(518, 322),
                  trainer_steps=5)
DRY_SIZES = Sizes(model="tiny", batch=4, resolution=56, native_grid=(3, 5), batch_patches=60, text_len=8,
                  vocab=64, steps=2, warmup=1, parity_batch=2, jpegs=4, native_decode=(70, 42), trainer_steps=2)


# ------------------------------------------------------------------------------------------ helpers

def importable(name: str) -> str | None:
    """None if `name` imports, else the one-line reason."""
    try:
        __import__(name)
        return None
    except Exception as e:  # an ImportError, or a broken install that raises something else
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]


class Budget:
    """Wall-clock budget of the whole check: parts and configurations that would not fit are skipped."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ------------------------------------------------------------------------------------------- parts

def part_env(device: torch.device, sizes: Sizes, **_) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": str(device), "cpu_count": os.cpu_count(),
            "cpus_in_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(), "sizes": sizes.__dict__}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    info["missing"] = {m: r for m in ("nvidia.dali", "polars", "webdataset", "click", "sentencepiece", "tqdm")
                       if (r := importable(m)) is not None}
    return info


def part_peak(device: torch.device, sizes: Sizes, ctx: dict, **_) -> dict:
    from .train.metrics import matmul_peak

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 256
    peak = matmul_peak(device, dtype, n=n, min_time=0.5 if device.type == "cuda" else 0.05)
    ctx["peak"] = peak
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "tflops": peak / 1e12}


def bench_run(sizes: Sizes, device: torch.device, native: bool, attention: str, compiled: bool,
              native_dynamic: str = "auto", pad_id: int = 0):
    """A trainer `Run` (train.trainer.Run, what build_run returns) for the steps part, built without a manifest
    or a tokenizer (the GPU machine may lack polars): the model, LossModule, optimiser, schedule and the
    torch.compile'd step as build_run makes them, so the steps part times train_step itself."""
    from .model.aimv2 import AIMv2
    from .model.config import model_config
    from .train.config import TrainConfig
    from .train.distributed import DistInfo
    from .train.optim import build_optimizer
    from .train.presets import resolve
    from .train.schedule import WarmupCosine
    from .train.compiling import compile_step
    from .train.trainer import LossModule, Run, run_precision

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
    if compiled:  # as the trainer compiles it (native: per block); the steps part draws one grid
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
    from .train.config import TrainConfig
    from .train.distributed import DistInfo
    from .train.tokenizer import Tokenizer
    from .train.trainer import make_loader

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
    from .train import trainer
    from .train.preempt import StopRequest

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
    from .model.flops import step_flops
    from .train.metrics import mfu
    from .train.compiling import compile_dynamic

    native = res == "native"
    grid = sizes.native_grid if native else (sizes.resolution // 14,) * 2
    B = max(1, sizes.batch_patches // (grid[0] * grid[1])) if native else sizes.batch
    row = {"resolution": res, "grid": list(grid), "attention": attention, "compile": compiled}
    # as the trainer's --compile-dynamic (train.compiling.compile_step): per-block graphs, auto is dynamic
    if compiled and native:
        row["dynamic"] = compile_dynamic(native_dynamic)
    use_loader = data is not None and not native
    row["batches"] = "loader" if use_loader else "synthetic"
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
    from .train.metrics import reference_peak

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
                    rows.append({**base, "status": "error", "reason": _reason(e)})
                print(f"  steps: {_row_line(rows[-1])}", flush=True)
    return {"rows": rows, "peak_tflops": peak / 1e12, "peak_source": peak_source,
            "measured_peak_tflops": (ctx.get("peak") or 0.0) / 1e12}


def _row_key(res: str, attention: str, compiled: bool) -> str:
    return f"{res}-{attention}-{'compiled' if compiled else 'eager'}"


def part_parity(device: torch.device, sizes: Sizes, **_) -> dict:
    """fp32 on both sides, TF32 off; same initial weights (one state dict), same batch and prefixes."""
    from aimv2data.batch import normalize

    from .model.masks import sample_prefix_lengths

    tol = {"encoder_max_abs": 2e-3, "loss_rel": 1e-4, "grad_rel": 1e-4}
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        grid = (sizes.resolution // 14,) * 2
        cpu = torch.device("cpu")
        model = bench_run(replace(sizes, batch=sizes.parity_batch), cpu, False, "sdpa", False).model
        batch = synthetic_batches(sizes.parity_batch, grid, sizes, cpu, n=1)[0]
        images, tokens = batch.images, batch.tokens
        prefix = sample_prefix_lengths(images.shape[0], grid[0] * grid[1], torch.Generator().manual_seed(1))
        images = normalize(images)  # the encoder's own input (training_loss normalises a batch's uint8)
        ref = _forward_parts(model, images, tokens, prefix, "sdpa")
        model.to(device)
        out = {}
        for kind in ("sdpa", "flex"):  # FlexAttention's forward runs on CPU too (unfused)
            got = _forward_parts(model, images.to(device), tokens.to(device), prefix.to(device), kind)
            out[kind] = {"encoder_max_abs": (got["encoder"].cpu() - ref["encoder"]).abs().max().item(),
                         "loss_img_rel": abs(got["loss_img"] - ref["loss_img"]) / abs(ref["loss_img"]),
                         "loss_text_rel": abs(got["loss_text"] - ref["loss_text"]) / abs(ref["loss_text"])}
        if device.type == "cuda":  # what CPU cannot test: FlexAttention's backward against SDPA's
            grads = {}
            for kind in ("sdpa", "flex"):
                model.zero_grad(set_to_none=True)
                model.set_attention(kind)
                loss, _ = model.training_loss(images.to(device), None, tokens.to(device), 0,
                                              prefix_len=prefix.to(device))
                loss.backward()
                grads[kind] = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
            diff = (grads["flex"] - grads["sdpa"]).norm() / grads["sdpa"].norm()
            out["flex_vs_sdpa_encoder_grad_rel"] = diff.item()
        ok = all(v["encoder_max_abs"] <= tol["encoder_max_abs"] and v["loss_img_rel"] <= tol["loss_rel"]
                 and v["loss_text_rel"] <= tol["loss_rel"] for k, v in out.items() if isinstance(v, dict))
        ok = ok and out.get("flex_vs_sdpa_encoder_grad_rel", 0.0) <= tol["grad_rel"]
        return {"tolerance": tol, "within_tolerance": ok, "cpu_vs_device": out, "batch": sizes.parity_batch,
                "grid": list(grid)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32


def _forward_parts(model, images, tokens, prefix, kind: str) -> dict:
    model.set_attention(kind)
    with torch.no_grad():
        p = model.cfg.encoder.patch_size
        enc = model.encoder(images, model.prefix_mask(prefix, (images.shape[2] // p) * (images.shape[3] // p)))
        _, parts = model.training_loss(images, None, tokens, 0, prefix_len=prefix)
    return {"encoder": enc.float().cpu(), "loss_img": parts["loss_img"].item(), "loss_text": parts["loss_text"].item()}


def make_jpegs(n: int, seed: int = 0, mp_range=(1.0, 3.0), dry_run: bool = False) -> list[tuple[bytes, int, int]]:
    """n baseline (non-progressive) JPEGs of 1-3 MP with photo-like content: smooth colour fields plus
    fine noise, so the entropy decoder has real work (a flat image decodes unrealistically fast)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mp = rng.uniform(0.02, 0.05) if dry_run else rng.uniform(*mp_range)
        aspect = rng.uniform(0.6, 1.7)
        w = int(math.sqrt(mp * 1e6 * aspect))
        h = int(mp * 1e6 / w)
        small = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.int16)
        img = np.clip(base + rng.integers(-24, 25, (h, w, 3), dtype=np.int16), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90, progressive=False)
        out.append((buf.getvalue(), w, h))
    return out


def part_decode(device: torch.device, sizes: Sizes, dry_run: bool, **_) -> dict:
    """DALI mixed vs pil (all host cores) on the same generated files, fixed 224 RandomResizedCrop and
    native resolution (resize to cover + centre crop)."""
    import numpy as np

    from aimv2data.loader.geometry import cover, random_resized_crop

    files = make_jpegs(sizes.jpegs, dry_run=dry_run)
    rng = np.random.default_rng(0)
    res = sizes.resolution if dry_run else 224
    modes = {"fixed": [random_resized_crop(w, h, res, rng) for _, w, h in files],
             "native": [cover(w, h, *sizes.native_decode) for _, w, h in files]}
    datas = [d for d, _, _ in files]
    out = {"files": len(files), "megapixels_mean": sum(w * h for _, w, h in files) / len(files) / 1e6,
           "bytes_mean": sum(len(d) for d in datas) / len(datas), "fixed_out": [res, res],
           "native_out": list(sizes.native_decode)}
    out["pil"] = {m: _pil_rate(datas, crops) for m, crops in modes.items()}
    why = importable("nvidia.dali")
    if why is not None:
        out["dali"] = {"status": "skipped", "reason": f"DALI is not importable ({why}); bring the wheel as this "
                       "module's header says (scripts/dali_chunks.sh)"}
    elif device.type != "cuda" and not dry_run:
        out["dali"] = {"status": "skipped", "reason": "no CUDA device: DALI 'mixed' decoding needs a GPU"}
    else:  # a dry run exercises the same calls on DALI's CPU pipeline
        out["dali"] = {"status": "ok", "backend": "mixed" if device.type == "cuda" else "cpu",
                       **{m: _dali_rate(datas, crops, device) for m, crops in modes.items()}}
    return out


def _pil_rate(datas, crops, batch: int = 32) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from aimv2data.loader.decode_pil import PilDecoder

    dec = PilDecoder()
    workers = affinity_cpus()
    chunks = [(datas[i:i + batch], crops[i:i + batch]) for i in range(0, len(datas), batch)]
    # Pillow releases the GIL while it decodes and resizes, so threads use every core
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda c: dec.decode(c[0][0], c[1][0]), chunks[:1]))  # warm-up
        t0 = time.perf_counter()
        failed = sum(len(f) for _, f in pool.map(lambda c: dec.decode_batch(*c), chunks))
        dt = time.perf_counter() - t0
    return {"images_per_s": len(datas) / dt, "threads": workers, "failed": failed}


def _dali_rate(datas, crops, device, batch: int = 32, reps: int = 3) -> dict:
    from aimv2data.loader.decode_dali import DaliDecoder

    dec = DaliDecoder(max_batch=batch, num_threads=4, device_id=(device.index or 0) if device.type == "cuda" else None)
    chunks = [(datas[i:i + batch], crops[i:i + batch]) for i in range(0, len(datas), batch)]
    dec.decode_batch(*chunks[0])  # warm-up: nvJPEG handles, pinned buffers
    _sync(device)
    t0 = time.perf_counter()
    failed = 0
    for _ in range(reps):
        for c in chunks:
            _, f = dec.decode_batch(*c)
            failed += len(f)
    _sync(device)
    dt = time.perf_counter() - t0
    dec.close()
    return {"images_per_s": reps * len(datas) / dt, "batch": batch, "failed": failed}


def part_trainer(device: torch.device, sizes: Sizes, workdir: Path, dry_run: bool, ctx: dict, **_) -> dict:
    """`aimv2 train`'s train() for a few steps on a manifest built here from generated JPEGs."""
    why = importable("polars")
    if why is not None:
        return {"status": "skipped", "reason": f"the loader's manifest side needs polars ({why})"}
    import tarfile

    from aimv2data.manifest.build import build_manifest

    from .train.tokenizer import train_tokenizer
    from .train.trainer import TrainConfig, train

    root = workdir / "trainer"
    shards = root / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    words = "red green blue small large round square bright dark striped dotted smooth".split()
    with tarfile.open(shards / "00000.tar", "w") as tar:  # an img2dataset-style shard, stdlib only
        for i, (data, w, h) in enumerate(make_jpegs(24, seed=2, mp_range=(0.1, 0.3), dry_run=dry_run)):
            key = f"{i:09d}"
            caption = " ".join(words[(i * k) % len(words)] for k in (1, 3, 5, 7)).encode()
            meta = json.dumps({"key": key, "status": "success", "url": f"http://bench/{key}.jpg",
                               "width": w, "height": h}).encode()
            for ext, payload in (("jpg", data), ("txt", caption), ("json", meta)):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(payload)
                tar.addfile(ti, io.BytesIO(payload))
    manifest, tok = root / "manifest", root / "tok.model"
    if not (manifest / "_manifest.json").exists():
        build_manifest([str(shards / "00000.tar")], manifest, progress=False)
    if not tok.exists():
        train_tokenizer(manifest, tok, vocab_size=128, soft_limit=True)
    ctx["data"] = {"manifest": str(manifest), "tokenizer": str(tok)}  # the steps part's loader batches
    run = root / f"run-{int(time.time())}"
    cfg = TrainConfig(manifest=str(manifest), tokenizer=str(tok), out=str(run), model="tiny",
                      steps=sizes.trainer_steps, resolution=56, batch_size=4, workers=0, device=str(device),
                      save_every=0, progress=False, peak_flops=1e12 if dry_run else None)
    s = train(cfg)
    return {"status_of_run": s["status"], "steps": s["step"],
            "device": str(device),
            **{k: s[k] for k in ("loss_start", "loss_end", "images_per_s", "mfu", "precision") if k in s}}


# --------------------------------------------------------------------------------------------- run

PART_FUNCS = {"env": part_env, "peak": part_peak, "steps": part_steps, "parity": part_parity,
              "decode": part_decode, "trainer": part_trainer}


def _reason(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}{where}"


def run(out: str | os.PathLike, *, dry_run: bool = False, device: str | None = None,
        parts: tuple[str, ...] = PARTS, budget_s: float = 420.0, workdir: str | os.PathLike | None = None,
        rows: tuple[str, ...] = (), native_dynamic: str = "auto") -> dict:
    """Run the check; every part ends "ok", "skipped" (with a reason) or "error" (with a reason)."""
    from aimv2data.atomic import write_json_atomic

    dev = torch.device(device or ("cpu" if dry_run or not torch.cuda.is_available() else "cuda"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    out = Path(out)
    work = Path(workdir) if workdir else out.parent / (out.stem + "_work")
    budget = Budget(budget_s)
    result = {"command": " ".join(sys.argv), "dry_run": dry_run, "device": str(dev),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": budget_s, "parts": {}}
    ctx: dict = {}
    t_all = time.perf_counter()
    for name in PARTS:
        t0 = time.perf_counter()
        if name not in parts:
            rec = {"status": "skipped", "reason": "not asked for (--parts)"}
        elif name in ("steps", "parity") and dev.type != "cuda" and not dry_run:
            rec = {"status": "skipped", "reason": "no CUDA device: AIMv2-L steps and CUDA/CPU parity need a GPU "
                   "(--dry-run runs them at tiny sizes on CPU)"}
        else:
            print(f"[{name}] ...", flush=True)
            try:
                body = PART_FUNCS[name](device=dev, sizes=sizes, ctx=ctx, budget=budget, dry_run=dry_run,
                                        workdir=work, rows_wanted=rows, native_dynamic=native_dynamic)
                rec = {"status": body.pop("status", "ok"), **body}
            except Exception as e:
                rec = {"status": "error", "reason": _reason(e)}
            rec["seconds"] = round(time.perf_counter() - t0, 2)
        result["parts"][name] = rec
        result["seconds"] = round(time.perf_counter() - t_all, 2)
        write_json_atomic(result, out, indent=1, default=str)
        if name not in parts:
            continue
        print(f"[{name}] {rec['status']} in {rec['seconds']:.1f} s" + (f": {rec['reason']}" if "reason" in rec else ""),
              flush=True)
    print(table(result))
    return result


def _row_line(r: dict) -> str:
    head = f"{r['resolution']:6s} {r['attention']:4s} {'compiled' if r['compile'] else 'eager':8s}"
    if r.get("status", "ok") != "ok":
        return f"{head} {r.get('status', '?')}: {r.get('reason', '')}"
    return (f"{head} B={r['batch']:<4d} {r['step_ms']:9.1f} ms/step {r['images_per_s']:9.1f} img/s "
            f"MFU {100 * r['mfu']:5.1f}%")


def table(result: dict) -> str:
    """The figures as plain text (no rich: the GPU machine may lack it)."""
    p = result["parts"]
    lines = [f"aimv2 bench gpu ({'dry run, ' if result['dry_run'] else ''}{result['device']}, "
             f"{result.get('seconds', 0):.0f} s)"]
    for name in PARTS:
        rec = p.get(name, {})
        lines.append(f"- {name}: {rec.get('status')}" + (f" ({rec['reason']})" if "reason" in rec else ""))
        if rec.get("status") != "ok":
            continue
        if name == "env":
            lines.append(f"    torch {rec['torch']} cuda {rec['cuda']} {rec.get('gpu', 'no GPU')}; missing: "
                         f"{', '.join(rec['missing']) or 'none'}")
        elif name == "peak":
            lines.append(f"    {rec['dtype']} matmul peak {rec['tflops']:.4g} TFLOP/s (n = {rec['n']})")
        elif name == "steps":
            lines.append(f"    MFU over {rec['peak_tflops']:.4g} TFLOP/s ({rec['peak_source']}), as the trainer's")
            lines += [f"    {_row_line(r)}" for r in rec["rows"]]
        elif name == "parity":
            lines.append(f"    within tolerance {rec['within_tolerance']} ({rec['tolerance']}): "
                         + json.dumps(rec["cpu_vs_device"]))
        elif name == "decode":
            for dec in ("pil", "dali"):
                d = rec.get(dec, {})
                if d.get("status", "ok") != "ok":
                    lines.append(f"    {dec}: {d.get('status')}: {d.get('reason')}")
                else:
                    lines.append(f"    {dec}: fixed {d['fixed']['images_per_s']:.1f} img/s, native "
                                 f"{d['native']['images_per_s']:.1f} img/s")
        elif name == "trainer":
            lines.append(f"    {rec.get('steps')} steps on {rec.get('device')}, {rec.get('status_of_run')}, loss "
                         f"{rec.get('loss_start', float('nan')):.4f} -> {rec.get('loss_end', float('nan')):.4f}, "
                         f"{rec.get('images_per_s', 0):.1f} img/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="aimv2 bench gpu", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_gpu.json", help="the JSON file written (rewritten after every part)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, the same code path (CI)")
    ap.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda if present; cpu with --dry-run)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="wall-clock seconds for the whole check; compiled configurations that would not fit are skipped")
    ap.add_argument("--rows", default="", help="steps: comma-separated subset of RES-ATTN-MODE rows, e.g. "
                    "native-flex-compiled,native-sdpa-compiled (default: all eight)")
    ap.add_argument("--native-dynamic", choices=("auto", "true", "false"), default="auto",
                    help="the native-resolution rows' per-block compile, as `aimv2 train --compile-dynamic`: "
                    "true / auto (dynamic block shapes), false (static block graphs, one per grid)")
    a = ap.parse_args(argv)
    parts = tuple(p.strip() for p in a.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    rows = tuple(r.strip() for r in a.rows.split(",") if r.strip())
    result = run(a.out, dry_run=a.dry_run, device=a.device, parts=parts, budget_s=a.budget, rows=rows,
                 native_dynamic=a.native_dynamic)
    print(f"wrote {a.out}")
    return 1 if any(r.get("status") == "error" for r in result["parts"].values()) else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
