"""Data parallelism through torchrun: DDP (replicated weights) or FSDP2 (`fully_shard`, each block's
parameters, gradients and optimiser state sharded across ranks). The backend is NCCL on CUDA and gloo
on CPU, so the same code path runs on a laptop (`torchrun --nproc_per_node 2 -m cli.main train ...`).

Each rank reads its own slice of every global batch (the loader is built with rank / world size), so
the global batch is world_size x the per-rank batch; gradients are averaged across ranks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from aimv2data.loader.decoders import decoder_spec

from .config import PARALLEL_MODES



@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_info() -> DistInfo:
    """Which rank am I, as torchrun says (RANK, WORLD_SIZE, LOCAL_RANK); rank 0 of 1 without torchrun."""
    if not launched_by_torchrun():
        return DistInfo(local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def group_info() -> DistInfo:
    """Which rank am I in the joined process group (for collectives); rank 0 of 1 when none is joined."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), launch_info().local_rank)
    return DistInfo()


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group torchrun describes (env://); a plain `python` run is rank 0 of 1. `timeout`
    (--dist-timeout) bounds how long a collective waits for the slowest rank (torch's default otherwise)."""
    if not launched_by_torchrun():
        return DistInfo()
    launch = launch_info()
    rank, world, local = launch.rank, launch.world_size, launch.local_rank
    if world == 1:
        return DistInfo(0, 1, local)
    global _OWNED
    if not dist.is_initialized():  # a caller that set up its own process group keeps it
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": torch.device("cuda", local)} if device.type == "cuda" else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend=backend, **kwargs)
        _OWNED = True
    return DistInfo(rank, world, local)


_OWNED = False  # whether init_distributed created the process group (then shutdown destroys it)


def shutdown() -> None:
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def cpu_threads(requested: int | None = None) -> tuple[int, str]:
    """Size torch's intra-op pool for this process: `requested` (--torch-threads) if given; else what
    OMP_NUM_THREADS says, if set; else the CPUs this process may run on (its affinity, which taskset,
    cgroups and SLURM narrow) divided among the ranks torchrun started on this machine (LOCAL_WORLD_SIZE).
    torch's own default is every core of the machine for every rank, so N ranks on one machine ask
    for N times the cores and their OpenMP barriers then wait on preempted threads (docs/train.md);
    torchrun's blanket OMP_NUM_THREADS=1 for multi-rank runs leaves all but N cores idle (--torch-threads 1
    still gets one thread).
    Returns (threads, why)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--torch-threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return requested, "--torch-threads"
    omp = os.environ.get("OMP_NUM_THREADS")
    torchrun_default = omp == "1" and launched_by_torchrun() and int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > 1
    if omp and not torchrun_default:  # torchrun sets 1 for every multi-rank run unless told: not a choice
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cpus = affinity_cpus()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    n = max(1, cpus // ranks)
    torch.set_num_threads(n)
    return n, f"{cpus} cpus in affinity / {ranks} local rank(s)"


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity, which taskset, cgroups and SLURM narrow); the machine's
    CPU count where the OS has no affinity call."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pick_device(requested: str | None, info: DistInfo | None = None) -> torch.device:
    """`--device` if given (cuda means this rank's local GPU), else the local GPU when there is one. Under
    torchrun with several ranks an explicit `cuda:N` is refused: it would put every rank on GPU N."""
    launch = info or launch_info()
    local = launch.local_rank
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"--device {requested!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and launch.world_size > 1:
        raise ValueError(f"--device {requested} under torchrun puts all {launch.world_size} ranks on GPU "
                         f"{device.index}: pass --device cuda (each rank takes its LOCAL_RANK's GPU)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested} was asked for, but torch sees no CUDA device "
                             "(drop --device to use what there is)")
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    return device


def decoder_device(device: torch.device) -> int | None:
    """The GPU a rank's DALI decoder runs on: its model's (under torchrun, its LOCAL_RANK's), so each rank
    decodes where it trains and no batch crosses GPUs; None (DALI on the CPU) for a model on the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def rank_devices(device: torch.device, decoder: str, info: DistInfo) -> list[dict]:
    """Every rank's model device and image decoder's device (one all-gather at start-up; run.json, the header)."""
    dali = decoder_device(device) if decoder_spec(decoder).gpu else None
    mine = {"rank": info.rank, "model": str(device), "decoder": f"{decoder} on " + ("cpu" if dali is None else f"cuda:{dali}")}
    if not info.enabled:
        return [mine]
    every: list = [None] * info.world_size
    dist.all_gather_object(every, mine)
    return every


def wrap_model(loss_module: nn.Module, mode: str, info: DistInfo, device: torch.device,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP or FSDP2 around the trainer's loss module (a no-op on one process).

    DDP wraps the loss module itself: its gradient hooks are armed by `forward`, which computes the loss.
    FSDP2 shards each of `loss_module.model.fsdp_units()` (its transformer blocks), then that model as the root
    (embeddings, heads, norms); with `param_dtype` (bf16) it gathers and computes in that dtype and reduces gradients
    in fp32. Parameters become DTensors: build the optimiser after this."""
    if not info.enabled:
        return loss_module
    if mode not in PARALLEL_MODES:
        raise ValueError(f"--parallel must be one of {PARALLEL_MODES}, got {mode!r}")
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(loss_module, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = loss_module.model
    mesh = init_device_mesh(device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for unit in model.fsdp_units():
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return loss_module


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over ranks of a small tensor of logged scalars (each rank's own loss otherwise)."""
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def barrier() -> None:
    """Wait for every rank of the joined process group (a no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
