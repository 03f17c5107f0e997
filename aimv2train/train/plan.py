"""What a run will need, known before its first step: `aimv2 train --dry-run` prints it, and a run whose
estimate does not fit its device stops at start with it.

Nothing big is built: the model's parameters are counted on the meta device, the memory of a step comes
from model/memory.py's formula at the run's worst step (fixed resolution: its one shape; native
resolution: every area A of aimv2data.paper.AREAS with B = C / A images, the largest estimate, which is
the smallest area once captions are counted: B x 77 x vocabulary logits). The device's memory is the
GPU's total, or on the CPU the machine's (MemTotal, or the cgroup's limit when lower).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from aimv2data.paper import AREAS, TEXT_LEN

from ..model.aimv2 import AIMv2, count_params
from ..model.config import ModelConfig, model_config
from ..model.masks import resolve_attention
from ..model.memory import StepMemory, step_memory
from .config import TrainConfig

# beyond the tensors: the CUDA context, kernels and workspaces (about 0.5-1 GB), the caching allocator's
# fragmentation (10 % of the step's bytes); on the CPU the Python process with torch loaded (~0.5 GB)
CUDA_RUNTIME, CPU_RUNTIME, FRAGMENTATION = 1 << 30, 1 << 29, 0.10
# torch.compile keeps fewer activations (Inductor recomputes cheap pointwise ops in backward): the GPU check
# (benchmarks/RESULTS.md, issue 15) ran the compiled L step at 224 px, batch 128, in 54 GiB, where this
# formula says ~64 GiB of activations eager; 0.7 of them, until the GPU check measures more
COMPILED_ACTIVATIONS = 0.7
# `--dry-run --device cuda` on a machine without one plans for an 80 GB GPU (an H100 80GB; torch reports
# 79.6 GiB of it)
ASSUMED_GPU = 80 * 10**9


@dataclass
class Plan:
    """The run's shape and its memory at the worst step; `rows` is the printed table."""
    rows: list[tuple[str, str]] = field(default_factory=list)
    peak: int = 0            # bytes on one device at the worst step, runtime included
    device_memory: int = 0   # bytes that device has
    device: str = ""
    memory: StepMemory | None = None   # the worst step's tensors by what holds them (runtime not included)

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory

    def verdict(self) -> str:
        """One line: the estimate against the device, and what to change when it does not fit."""
        if self.fits:
            return f"fits: {gib(self.peak)} of {gib(self.device_memory)} on {self.device}"
        return (f"does not fit: the worst step needs about {gib(self.peak)} per device, {self.device} has "
                f"{gib(self.device_memory)}; add --grad-checkpointing, raise --grad-accum, lower --batch-size / "
                f"--batch-patches, or use more ranks with --parallel fsdp (`aimv2 train ... --dry-run` prints this)")


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has: the GPU's total; on the CPU the machine's, or its cgroup's limit."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return ASSUMED_GPU
        return torch.cuda.get_device_properties(device).total_memory
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def count_model_params(mcfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only, no storage
        return count_params(AIMv2(mcfg))


def plan_run(cfg: TrainConfig, mcfg: ModelConfig, device: torch.device, world_size: int, precision: str,
             resolution: int | None, text_len: int = TEXT_LEN) -> Plan:
    """The plan of `cfg` on `device` with `world_size` ranks (model/memory.py's estimate per device);
    `resolution` the run's (None: native resolution)."""
    params = count_model_params(mcfg)
    p = mcfg.encoder.patch_size
    act = 2 if precision == "bf16" else 4
    dense = resolve_attention(cfg.attention, device) == "sdpa" and device.type == "cpu"
    parallel = cfg.parallel if world_size > 1 else "none"
    shapes = ([(a, max(1, cfg.batch_patches // a)) for a in AREAS] if cfg.native_res
              else [((resolution // p) ** 2, cfg.batch_size)])

    def at(shape) -> StepMemory:
        n, b = shape
        mem = step_memory(mcfg, params, n, b, text_len, act=act, micro_batches=cfg.grad_accum,
                          checkpointing=cfg.grad_checkpointing, dense_attention=dense, parallel=parallel,
                          world_size=world_size, gather_bytes=act)
        return replace(mem, activations=int(COMPILED_ACTIVATIONS * mem.activations)) if cfg.compile else mem

    (n, b), mem = max(((s, at(s)) for s in shapes), key=lambda sm: sm[1].total)
    runtime = CUDA_RUNTIME if device.type == "cuda" else CPU_RUNTIME
    slack = int(FRAGMENTATION * (mem.activations + mem.transient)) if device.type == "cuda" else 0
    peak = mem.total + runtime + slack
    micro = -(-b // max(1, min(cfg.grad_accum, b)))
    images = ", ".join(f"A={a}: {max(1, cfg.batch_patches // a)}" for a in AREAS) if cfg.native_res else str(b)
    patches_step = world_size * (cfg.batch_patches if cfg.native_res else b * n)
    text_step = world_size * b * text_len  # at most: captions shorter than the limit are padded
    plan = Plan(peak=peak, device_memory=device_memory(device), device=_device_name(device), memory=mem)
    plan.rows = [
        ("model", f"{cfg.model}: {params / 1e6:.1f}M parameters (encoder {mcfg.encoder.dim} x {mcfg.encoder.depth}, "
                  f"decoder {mcfg.decoder.dim} x {mcfg.decoder.depth}, vocabulary {mcfg.decoder.vocab_size})"),
        ("data", f"native resolution, C = {cfg.batch_patches} patches per rank" if cfg.native_res
         else f"{resolution} px, {b} images per rank"),
        ("images per rank-step", images),
        ("ranks", f"{world_size} ({parallel})"),
        ("global batch", (f"{world_size * cfg.batch_patches} patches ({world_size} x {cfg.batch_patches}); "
                          f"{world_size * b} images at the worst step" if cfg.native_res
                          else f"{world_size * b} images ({world_size} x {b})")),
        ("steps", f"{cfg.steps:,}"),
        ("tokens per step", f"{patches_step:,} image patches, <= {text_step:,} caption tokens"),
        ("tokens in the run", f"{patches_step * cfg.steps:.3g} image patches, <= {text_step * cfg.steps:.3g} "
                              "caption tokens"),
        ("worst step", f"{b} images of {n} patches" + (f" (area A = {n})" if cfg.native_res else "")
         + f", {micro} per micro-batch (--grad-accum {cfg.grad_accum})"
         + (", activation checkpointing" if cfg.grad_checkpointing else "")),
        ("precision", f"{precision} activations, fp32 weights / gradients / AdamW moments"),
        ("memory per device", gib(peak)),
        ("  weights + grads + AdamW", gib(mem.weights + mem.gradients + mem.optimizer)
         + (f" (1/{world_size} each: FSDP)" if parallel == "fsdp" else "")),
        ("  " + ("DDP gradient buckets" if parallel == "ddp" else "FSDP gathered blocks" if parallel == "fsdp"
                 else "data parallelism"), gib(mem.parallel)),
        ("  batch on the device", gib(mem.batch)),
        ("  activations", gib(mem.activations) + f" (one micro-batch of {micro}"
         + (f"; compiled: x {COMPILED_ACTIVATIONS} of eager's" if cfg.compile else "") + ")"),
        ("  backward's transients", gib(mem.transient)),
        ("  runtime" + (" + fragmentation" if slack else ""), gib(runtime + slack)),
        ("device", f"{plan.device}: {gib(plan.device_memory)}"),
    ]
    return plan


def model_for_plan(cfg: TrainConfig, vocab_size: int | None, resolution: int | None) -> ModelConfig:
    """The run's model config (build_model's), with the tokenizer's vocabulary or, without one, the
    preset's (the paper's SigLIP vocabulary, 32000, for the paper's sizes)."""
    return model_config(cfg.model, vocab_size=vocab_size, pos_embed="sincos" if cfg.native_res else "learned",
                        img_size=resolution or 224)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{device} (assumed: an 80 GB GPU, none here)"
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu (this machine's memory)"
