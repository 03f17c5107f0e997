"""Training checkpoints: one file per checkpoint, written atomically, newest = the one to resume.

    RUN/checkpoints/step_00000100.pt       torch.save'd dict, readable with torch.load(weights_only=True):
        config        ModelConfig.to_dict()        (what interop.load_encoder needs)
        model         full model state dict        (fp32, no DDP/compile prefixes)
        optimizer     optimiser state dict         (absent when sharded: see .dcp)
        step          optimiser steps done
        train         the run's TrainConfig, hparams, schedule, world size, parallel mode
        ranks         per rank: loader state and RNG states (torch, cuda, python, numpy, prefix generator)
        tokenizer     the sentencepiece model bytes (as a uint8 tensor), so a run directory is self-contained
    RUN/checkpoints/step_00000100.dcp/     FSDP2 only: model + optimiser shards (torch.distributed.checkpoint)

A file appears under its final name only complete (torch.save to a hidden temp file, then os.replace),
and the .dcp directory is renamed into place before its .pt is written, so whatever kills a save leaves
the previous checkpoint as the newest complete one. Older checkpoints beyond `keep` are removed after
a new one is in place.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from aimv2data.atomic import atomic_torch_save

from .distributed import barrier, group_info
from .rundir import checkpoint_name, checkpoints_dir, list_checkpoints, run_config  # noqa: F401 (the run's files)


def plain(obj):
    """numpy values -> Python/torch so the file loads with weights_only=True."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# ---------------------------------------------------------------------------------------------- RNG

def rng_state(generator: torch.Generator | None = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "generator": generator.get_state() if generator is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------- save / load

def _world() -> tuple[int, int]:
    info = group_info()
    return info.rank, info.world_size


def _gather(obj) -> list:
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def save_checkpoint(directory: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, *, model_config: dict, train: dict,
                    rank_state: dict, tokenizer_bytes: bytes | None = None, sharded: bool = False,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` (collective: every rank calls it). Returns the .pt path."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_state_dict)

    rank, world = _world()
    d = Path(directory)
    path = d / checkpoint_name(step)
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
    ranks = _gather(plain(rank_state))
    payload = None
    if sharded:
        import torch.distributed.checkpoint as dcp

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp_tmp, dcp_dir = d / f".{path.stem}.dcp.tmp", d / f"{path.stem}.dcp"
        if rank == 0 and dcp_tmp.exists():
            shutil.rmtree(dcp_tmp)
        barrier()
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(dcp_tmp))
        barrier()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            if dcp_dir.exists():
                shutil.rmtree(dcp_dir)
            os.replace(dcp_tmp, dcp_dir)
            payload = {"model": full}
    elif rank == 0:
        bare = unwrap(model)
        payload = {"model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
                   "optimizer": optimizer.state_dict()}
    if rank == 0:
        payload.update(config=model_config, step=step, train=plain(train), ranks=ranks)
        if tokenizer_bytes is not None:
            payload["tokenizer"] = torch.frombuffer(bytearray(tokenizer_bytes), dtype=torch.uint8)
        atomic_torch_save(payload, path)
        prune(d, keep)
    barrier()
    return path


def prune(directory: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: all); drop older ones and leftovers of killed saves."""
    ckpts = list_checkpoints(directory)
    live = {p.stem for _, p in ckpts}
    for p in directory.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name:  # a save that died; ours run only on rank 0
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        elif p.suffix == ".dcp" and p.stem not in live:  # renamed into place, but its .pt never came
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for _, p in ckpts[:-keep]:
            p.unlink(missing_ok=True)
            shutil.rmtree(p.with_suffix(".dcp"), ignore_errors=True)


class CheckpointDamaged(ValueError):
    """A checkpoint file that fails its integrity check or cannot be unpickled."""


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointDamaged unless every member of the checkpoint's zip archive matches the CRC-32 that
    torch.save recorded for it. torch.load itself never checks them: bytes damaged inside a tensor
    load silently and the run goes NaN."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointDamaged(f"checkpoint {path} is damaged ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointDamaged(f"checkpoint {path} is damaged (CRC mismatch in {bad})")


def is_zip_checkpoint(path: str | os.PathLike) -> bool:
    """A torch.save'd file (zip archive); not safetensors or a legacy pickle."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def read_checkpoint(path: str | os.PathLike, verify: bool = True) -> dict:
    """The checkpoint's dict, its tensors memory-mapped (mmap=True: a page is read when a tensor is used, so
    a rank that takes its weights by broadcast reads only the small pickled part); `verify` checks the CRCs
    first (a full read of the file)."""
    if verify:
        verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and why
        raise CheckpointDamaged(f"checkpoint {path} cannot be read ({type(e).__name__}: {e})") from None


class WeightsError(ValueError):
    """A path that names no usable weights (missing, damaged, no such step, a run without checkpoints);
    the message says what to do. Raised alike for `train --init`, export, probe and embed."""


class NoIntactCheckpoint(WeightsError):
    """Checkpoints exist but none reads back: resuming would silently restart from step 0."""


def latest_checkpoint(directory: str | os.PathLike, notify=None, use: str = "resuming from") -> tuple[Path, dict] | None:
    """The newest checkpoint that passes its integrity check (each damaged newer one is reported through
    `notify`, one line naming it and the one `use`d, and skipped). None when there is none at all;
    NoIntactCheckpoint when every one is damaged, so the caller can refuse before touching the run."""
    found = list_checkpoints(directory)
    damaged = []
    for _step, p in reversed(found):
        try:
            state = read_checkpoint(p)
        except ValueError as e:
            damaged.append(str(e))
            continue
        if damaged and notify is not None:
            notify(f"{len(damaged)} newer checkpoint(s) damaged ({damaged[0]}); {use} {p.name}")
        return p, state
    if found:
        raise NoIntactCheckpoint(
            f"none of the {len(found)} checkpoints in {directory} is intact ({damaged[0]}); nothing was "
            f"changed: restore a good copy into {directory}, or start a new run with another --output")
    return None


def resolve_weights(path: str | os.PathLike, step: int | None = None, notify=None) -> tuple[Path, Path | None]:
    """Which weights `path` names: (checkpoint or weights path, its run directory or None). The one
    resolver of `train --init`, export, probe and embed, with --resume's policy (latest_checkpoint):

    * a run directory, or its checkpoints/, names its newest *intact* checkpoint; each damaged newer one
      is skipped with one notice (`notify`) naming it and the one used, so a path means the same weights
      to a resume and to an export; none intact is refused;
    * a checkpoint named exactly (a file, or `step`) is refused when damaged: those bytes were asked for;
    * anything else (a transformers folder, ml-aim weights) is returned as is, for interop.load_encoder.
    """
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p} does not exist")
    if p.is_file():
        if step is not None:
            raise WeightsError(f"--step {step} picks a checkpoint of a run directory; {p} is one file already")
        _refuse_damaged(p)
        return p, (p.parent.parent if p.parent.name == "checkpoints" and run_config(p.parent.parent) else None)
    ckdir = checkpoints_dir(p)
    run = p if ckdir != p else (p.parent if list_checkpoints(p) and run_config(p.parent) is not None else None)
    ckpts = list_checkpoints(ckdir)
    if not ckpts:
        if run is not None:
            raise WeightsError(f"{p}: a run directory without checkpoints (nothing in {ckdir}); was the run "
                               f"stopped before its first save? Resume it with `aimv2 train ... --resume`")
        if step is not None:
            raise WeightsError(f"--step {step}: {p} is not a training run (no checkpoints/step_*.pt)")
        return p, None
    if step is not None:
        found = [f for s, f in ckpts if s == step]
        if not found:
            raise WeightsError(f"{ckdir} has no checkpoint for step {step}; it has steps {[s for s, _ in ckpts]}")
        _refuse_damaged(found[0])
        return found[0], run
    try:
        newest, _ = latest_checkpoint(ckdir, notify, use="using")
    except NoIntactCheckpoint as e:
        raise NoIntactCheckpoint(f"{e}: restore a good copy into {ckdir}, or train again") from None
    return newest, run


def _refuse_damaged(path: Path) -> None:
    if is_zip_checkpoint(path):   # one of ours (or another torch.save'd file): its CRC-32s
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            raise WeightsError(f"{e}; use an intact one (`--step`, or the previous file in its checkpoints/, "
                               "or the run directory: its newest intact checkpoint)") from None



def resume_checkpoint(directory: str | os.PathLike, notify=None) -> tuple[Path, dict] | None:
    """`latest_checkpoint` for every rank (collective): rank 0 alone checks the CRCs (a full read of each file
    it tries) and broadcasts its choice; the others map that file (read_checkpoint without verify), so a node
    of 8 ranks does not read the whole checkpoint 8 times before the first step. Errors reach every rank."""
    rank, world = _world()
    if world == 1:
        return latest_checkpoint(directory, notify)
    choice, error = [None, None], None  # the path rank 0 resumes from, or why it cannot (then every rank raises)
    if rank == 0:
        try:
            found = latest_checkpoint(directory, notify)
            choice[0] = str(found[0]) if found else None
        except Exception as e:  # noqa: BLE001 - the others would wait in the broadcast until --dist-timeout
            error, choice[1] = e, (isinstance(e, NoIntactCheckpoint), f"{type(e).__name__}: {e}", str(e))
    dist.broadcast_object_list(choice, src=0)
    if error is not None:
        raise error
    if choice[1] is not None:
        none_intact, described, message = choice[1]
        if none_intact:
            raise NoIntactCheckpoint(message)
        raise RuntimeError(f"rank 0 could not read the checkpoints in {directory} ({described})")
    if choice[0] is None:
        return None
    if rank == 0:
        return found
    return Path(choice[0]), read_checkpoint(choice[0], verify=False)


def load_training_state(ckpt_path: Path, ckpt: dict, model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, sharded: bool) -> None:
    """Model and optimiser state from a checkpoint written by `save_checkpoint` (collective under torchrun:
    FSDP ranks read their DCP shards, DDP ranks other than 0 receive rank 0's by broadcast)."""
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        dcp_dir = ckpt_path.with_suffix(".dcp")
        if not dcp_dir.is_dir():
            raise FileNotFoundError(f"{ckpt_path} was written without FSDP sharded state ({dcp_dir} missing): "
                                    f"resume it with the parallel mode it was trained with "
                                    f"({ckpt['train'].get('parallel')})")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(dcp_dir))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return
    if "optimizer" not in ckpt:
        raise ValueError(f"{ckpt_path} holds sharded (FSDP) optimiser state; resume with --parallel fsdp")
    rank, world = _world()
    if world == 1 or rank == 0:
        unwrap(model).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    else:  # the state's layout from the mapped file's metadata (its data pages stay unread), values from rank 0
        optimizer.load_state_dict(_empty_like(ckpt["optimizer"]))
    if world > 1:
        _broadcast_state(model, optimizer)


def _empty_like(obj):
    """`obj` with every tensor replaced by an uninitialised one of its shape and dtype."""
    if isinstance(obj, dict):
        return {k: _empty_like(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_empty_like(v) for v in obj)
    return torch.empty_like(obj) if isinstance(obj, torch.Tensor) else obj


def _broadcast_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Rank 0's weights, buffers and optimiser state into every rank's, in place, tensor by tensor in the
    same order on every rank (parameters in their group order); through the model's device (NCCL needs CUDA
    tensors; the optimiser's step counts live on the CPU)."""
    device = next(unwrap(model).parameters()).device
    tensors = list(unwrap(model).state_dict().values())
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            tensors += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    for t in tensors:
        buf = t if t.device == device else t.to(device)
        dist.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)
