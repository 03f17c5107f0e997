"""The training loop: `train(TrainConfig) -> summary`.

One optimiser step = one loader batch per rank -> prefix lengths from a seeded CPU generator ->
L_text + alpha * L_img under autocast -> backward -> clip to 1.0 -> fully decoupled AdamW with the
warmup-cosine rate. Everything a step depends on (weights, optimiser moments, schedule step, loader
position, RNG states) is in the checkpoint, so `--resume` continues the same run: on CPU its losses
are identical to an uninterrupted run's.

The loss is evaluated inside `LossModule.forward` so that DDP's gradient hooks and torch.compile
both see it (both only act through `forward`).

The parts: `build_run` (settings, resume decision, model, optimiser, loader -> a `Run`), `train_step`
(one optimiser step -> its named loss terms), `train_loop` (steps, metrics, checkpoints) and `_finish`
(the summary). Loss terms are named by the model (model/aimv2.py LOSS_TERMS); everything here iterates
over those names.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from aimv2data.atomic import is_disk_full, read_jsonl, write_json_atomic
from aimv2data.manifest.lock import LOCK_NAME, LockHeld, output_lock
from aimv2data.paper import TEXT_LEN
from aimv2data.batch import REPLACED_KINDS, Batch, replaced_kind

from . import checkpoint as ck
from .compiling import compile_counts, compile_dynamic, compile_step, counts_since, warmup_shapes, watch_compiles
from .config import TrainConfig
from ..model.config import ModelConfig, model_config, preset_name
from .distributed import (DistInfo, all_reduce_mean, cpu_threads, decoder_device, init_distributed, launch_info,
                          pick_device, rank_devices, shutdown, wrap_model)
from ..model.flops import step_flops
from ..model.config import ATTENTION_KINDS
from ..model.masks import sample_prefix_lengths
from .health import caption_coverage, caption_shares, replaced_summary
from .logline import PeriodicLine
from .metrics import MetricsLog, mfu, reference_peak, summarize
from ..model.aimv2 import LOSS_TERMS, TOTAL_LOSS, AIMv2, count_params
from .optim import build_optimizer
from .plan import Plan, model_for_plan, plan_run
from .preempt import StopRequest, notice
from .presets import STAGES, HParams, resolve
from .rundir import existing_run
from .schedule import WarmupCosine
from .tokenizer import Tokenizer
from .tracking import TrackingError, open_sinks, parse_report_to
from .validate import Validator


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says what and what to do."""


class WontFit(TrainError):
    """The run's estimated memory at its worst step exceeds its device's; `plan` is the table to show."""

    def __init__(self, plan):
        super().__init__(plan.verdict())
        self.plan = plan


class NonFiniteLoss(TrainError):
    """The loss or the gradient norm became inf/nan; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------- building blocks

class LossModule(nn.Module):
    """forward(images, patches, tokens, prefix_len) -> {"loss": total, **the model's LOSS_TERMS}, 0-d tensors
    (the total carries the graph; the terms are detached)."""

    def __init__(self, model: AIMv2, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, images, patches, tokens, prefix_len, term_weights=None):
        loss, parts = self.model.training_loss(images, patches, tokens, self.pad_id, prefix_len=prefix_len,
                                               term_weights=term_weights)
        return {TOTAL_LOSS: loss, **{k: parts[k] for k in LOSS_TERMS}}


def _check(cfg: TrainConfig) -> None:
    stage = cfg.resolved_stage()
    if stage not in STAGES:
        raise TrainError(f"--stage {stage!r} is not one of {list(STAGES)}")
    st = STAGES[stage]
    if st.native and not cfg.native_res:
        raise TrainError("--stage native trains at native resolution: add --native-res --batch-patches C")
    if stage == "highres" and cfg.native_res:
        raise TrainError("--stage highres is a fixed-resolution stage (--resolution 336|448); drop --native-res")
    if st.needs_init and not cfg.init and not cfg.dry_run:
        raise TrainError(f"--stage {stage} fine-tunes a pre-trained model: pass --init CHECKPOINT "
                         f"(a run directory, a checkpoint .pt, a transformers folder or ml-aim weights)")
    if cfg.stop_at is not None and not 0 < cfg.stop_at <= cfg.steps:
        raise TrainError(f"--stop-at {cfg.stop_at} must be in [1, --steps {cfg.steps}]")
    if cfg.save_every < 0:
        raise TrainError(f"--save-every must be >= 0 (0: only at the end / --stop-at), got {cfg.save_every}")
    if cfg.attention not in ATTENTION_KINDS:
        raise TrainError(f"--attention must be one of {ATTENTION_KINDS}, got {cfg.attention!r}")
    if cfg.compile_warmup and not cfg.compile:
        raise TrainError("--compile-warmup compiles the step's graphs before step 0: add --compile")
    if cfg.precision not in (None, "bf16", "fp32"):
        raise TrainError(f"--precision must be bf16 or fp32, got {cfg.precision!r}")
    if cfg.val_every < 0:
        raise TrainError(f"--val-every must be >= 0 (0: only at the end), got {cfg.val_every}")
    try:
        parse_report_to(cfg.report_to)
    except TrackingError as e:
        raise TrainError(str(e)) from None
    _check_values(cfg)


def _check_values(cfg: TrainConfig) -> None:
    """Values that would otherwise be ignored or fail late (after run.json is written)."""
    if cfg.resolution is not None and cfg.resolution < 1:
        raise TrainError(f"--resolution must be positive, got {cfg.resolution}")
    if cfg.resolution is not None and cfg.native_res:
        raise TrainError("--resolution has no effect with --native-res (image sizes come from --batch-patches): "
                         "drop one of them")
    for flag, value, low in (("--steps", cfg.steps, 1), ("--batch-size", cfg.batch_size, 1),
                             ("--batch-patches", cfg.batch_patches, 1), ("--workers", cfg.workers, 0),
                             ("--keep", cfg.keep, 0), ("--grad-accum", cfg.grad_accum, 1)):
        if value < low:
            raise TrainError(f"{flag} must be >= {low}, got {value}")
    if not cfg.dist_timeout > 0:
        raise TrainError(f"--dist-timeout is in minutes and must be > 0, got {cfg.dist_timeout}")
    if not 0 <= cfg.warn_replaced <= 1:
        raise TrainError(f"--warn-replaced is a share of the samples drawn, in [0, 1]; got {cfg.warn_replaced}")


def build_model(cfg: TrainConfig, tok: Tokenizer, resolution: int) -> AIMv2:
    mcfg = model_config(cfg.model, vocab_size=tok.vocab_size,
                        pos_embed="sincos" if cfg.native_res else "learned",
                        img_size=224 if cfg.native_res else resolution)
    if tok.max_len > mcfg.decoder.max_text_len:
        raise TrainError(f"the tokenizer makes {tok.max_len}-token captions, the decoder has "
                         f"{mcfg.decoder.max_text_len} positions")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every rerun
    model = AIMv2(mcfg)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model.set_attention(cfg.attention)
    return model


def _init_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights for --init: the full model from one of our checkpoints (file, checkpoints dir or run dir),
    else the encoder from anything interop.load_encoder reads (transformers folder, ml-aim weights)."""
    try:  # a run: its newest intact checkpoint, a damaged newer one named in a notice (resolve_weights)
        p, _ = ck.resolve_weights(path, notify=notice)
    except ck.WeightsError as e:
        raise TrainError(f"--init {e}") from None
    if p.is_file() and p.suffix in (".pt", ".pth"):
        try:
            state = ck.read_checkpoint(p, verify=False)   # resolve_weights checked its CRC-32s
        except ValueError:
            state = None   # not one of ours: load_encoder's turn
        sd = state.get("model") if isinstance(state, dict) else None
        if isinstance(sd, dict) and "encoder.patch_embed.proj.weight" in sd:
            return sd, f"{p} (full model, step {state.get('step', '?')})"
    from ..model.interop import load_encoder

    try:
        enc = load_encoder(p)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(f"--init {path}: {e}") from None
    return {f"encoder.{k}": v for k, v in enc.state_dict().items()}, f"{p} (encoder only)"


def load_init(model: AIMv2, path: str) -> str:
    """Load --init weights, adapting the position table: bicubic resample of a learned table to the new
    grid (high-res stage), dropped for a sin-cos model (native stage). Returns a one-line description."""
    sd, what = _init_state_dict(path)
    try:
        sd, notes = model.adapt_state_dict(sd)
    except ValueError as e:
        raise TrainError(f"--init {path}: {e}") from None
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise TrainError(f"--init {path} does not fit --model {model.cfg.encoder.dim}-wide x "
                         f"{model.cfg.encoder.depth}: {str(e).splitlines()[-1].strip()}") from None
    if unexpected:
        raise TrainError(f"--init {path}: unexpected weights {unexpected[:4]}")
    enc_missing = [k for k in missing if k.startswith("encoder.") and k != "encoder.pos_embed"]
    if enc_missing:
        raise TrainError(f"--init {path}: encoder weights missing: {enc_missing[:4]}")
    if "encoder.pos_embed" in missing:
        notes.append("learned position table newly initialised (the init has sin-cos positions)")
    rest = [k for k in missing if k != "encoder.pos_embed"]
    if rest:
        part = "decoder and heads" if any(k.startswith("decoder.") for k in rest) else ", ".join(rest[:3])
        notes.append(f"{len(rest)} tensors newly initialised ({part})")
    return what + ("; " + "; ".join(notes) if notes else "")


def make_loader(cfg: TrainConfig, tok: Tokenizer, info: DistInfo, resolution: int | None, patch_size: int,
                device: torch.device | None = None):
    """This rank's loader (its slice of every global batch, captions tokenized by `tok`); one segment per
    iter(), resumable through state_dict(). A DALI decoder runs on `device`'s GPU (this rank's)."""
    from aimv2data.loader import Loader

    dali = "auto" if device is None else decoder_device(device)
    kwargs = dict(tokenizer=tok, pad_id=tok.pad_id, rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                  dali_device=dali,
                  workers=cfg.workers, decoder=cfg.image_decoder, pin_memory=torch.cuda.is_available(), mix=cfg.mix,
                  caption_mix=cfg.caption_mix,
                  cache_dir=cfg.cache_dir, cache_gb=cfg.cache_gb if cfg.cache_dir else 0.0)
    if cfg.native_res:
        loader = Loader(cfg.manifest, native_res=True, batch_patches=cfg.batch_patches, **kwargs)
    else:
        loader = Loader(cfg.manifest, resolution=resolution, batch_size=cfg.batch_size, **kwargs)
    if loader.patch_size != patch_size:
        raise TrainError(f"the manifest {cfg.manifest} was bucketed for patch size {loader.patch_size}, the model "
                         f"uses {patch_size}: rebuild it with `aimv2 shard --patch-size {patch_size}`")
    return loader


def _validator(cfg: TrainConfig, tok: Tokenizer, info: DistInfo, device: torch.device, precision: str,
               resolution: int | None) -> Validator | None:
    if not cfg.val_manifest:
        return None
    try:
        return Validator(cfg.val_manifest, tok, info, device, native_res=cfg.native_res, resolution=resolution,
                         batch_size=cfg.batch_size, batch_patches=cfg.batch_patches, max_batches=cfg.val_batches,
                         workers=cfg.workers, decoder=cfg.image_decoder,
                         autocast=lambda: autocast_context(device, precision))
    except ValueError as e:
        raise TrainError(str(e)) from None


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grad_norm(params: list[torch.Tensor], clip: float) -> torch.Tensor:
    """Clip in place; the total norm before clipping, a 0-d tensor on the device (not read here)."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return norm


# ------------------------------------------------------------------------------------------ the run

def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the run `cfg.out`; returns the summary (also written to RUN/summary.json).

    Raises TrainError for bad input and NonFiniteLoss when the loss diverges. Under torchrun every
    rank calls this; rank 0 writes metrics, checkpoints and the summary."""
    _check(cfg)
    threads_before = torch.get_num_threads()
    cpu_threads(cfg.threads)  # this run's share of the cores; the caller's setting comes back after
    try:
        device = plan_device(cfg.device) if cfg.dry_run else pick_device(cfg.device)
        if cfg.attention == "flex" and device.type != "cuda":
            raise TrainError(f"--attention flex needs a CUDA device (FlexAttention has no backward on "
                             f"{device.type}): use --attention sdpa, the default there")
        if cfg.dry_run:  # WORLD_SIZE alone (no torchrun) plans for that many ranks
            return {"status": "dry_run", "rank": launch_info().rank,
                    "plan": make_plan(cfg, device, int(os.environ.get("WORLD_SIZE", "1")))}
        plan = make_plan(cfg, device, launch_info().world_size)
        if not plan.fits:  # before anything is built: not minutes later in the allocator
            raise WontFit(plan)
        info = init_distributed(device, timeout=datetime.timedelta(minutes=cfg.dist_timeout))
        try:
            with _run_folder(cfg, info):
                return _train(cfg, info, device)
        except (OSError, RuntimeError) as e:
            if not is_disk_full(e):
                raise
            raise TrainError(_disk_full_message(cfg.out, e)) from None
        finally:
            shutdown()
    finally:
        torch.set_num_threads(threads_before)


def make_plan(cfg: TrainConfig, device: torch.device, world_size: int) -> Plan:
    """The run's plan (plan.py): its memory per device at the worst step, global batch, steps, tokens."""
    tok = Tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    resolution = run_resolution(cfg)
    mcfg = model_for_plan(cfg, tok.vocab_size if tok else None, resolution)
    return plan_run(cfg, mcfg, device, world_size, run_precision(cfg, device), resolution,
                    text_len=tok.max_len if tok else TEXT_LEN)


def plan_device(requested: str | None) -> torch.device:
    """--dry-run's device: --device's, also `cuda` on a machine without one (planned as an assumed GPU,
    plan.ASSUMED_GPU), else pick_device's."""
    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        try:
            return torch.device(requested)
        except RuntimeError:
            raise TrainError(f"--device {requested!r} is not a device: use cpu, cuda or cuda:N") from None
    try:
        return pick_device(requested)
    except ValueError as e:
        raise TrainError(str(e)) from None


def run_precision(cfg: TrainConfig, device: torch.device) -> str:
    return cfg.precision or ("bf16" if device.type == "cuda" else "fp32")


def run_resolution(cfg: TrainConfig) -> int | None:
    """Fixed resolution in pixels (the stage's default unless --resolution); None at native resolution."""
    return None if cfg.native_res else (cfg.resolution or STAGES[cfg.resolved_stage()].resolution)


@contextlib.contextmanager
def _run_folder(cfg: TrainConfig, info: DistInfo):
    """Rank 0, the run folder's one writer, checks that RUN and RUN/checkpoints take files and holds RUN/.lock
    for the whole run, so a second `train --output RUN` refuses, naming the holder. The other ranks take no lock:
    a second job's rank 0 is refused, and the kernel frees the lock however the run ends."""
    if not info.is_main:
        yield
        return
    out = Path(cfg.out)
    made = [f for f in (out, out / "checkpoints", out / LOCK_NAME) if not f.exists()]
    for folder in (out, out / "checkpoints"):
        _check_writable(folder)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(output_lock(out, tool="aimv2 train"))
        except LockHeld as e:
            raise TrainError(str(e)) from None
        try:
            yield
        except BaseException:
            _remove_unused(out, made)
            raise


def _remove_unused(out: Path, made: list[Path]) -> None:
    """A run refused before it wrote anything leaves nothing new: what `_run_folder` made (the run folder,
    its checkpoints folder, the lock) goes again."""
    try:
        if {p.name for p in out.iterdir()} - {LOCK_NAME, "checkpoints"} or any((out / "checkpoints").iterdir()):
            return
    except OSError:
        return
    for f in reversed(made):
        try:
            f.rmdir() if f.is_dir() else f.unlink(missing_ok=True)
        except OSError:  # not empty: the run wrote into it
            pass


def _check_writable(folder: Path) -> None:
    """A folder that cannot take a file fails here, before any step, not at the first checkpoint."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        if is_disk_full(e):
            raise
        raise TrainError(f"{folder} is not writable ({e.strerror or e}): the run could not save its checkpoints "
                         f"there; fix its permissions or mount, or choose another --output") from None


def _disk_full_message(out: str, e: BaseException) -> str:
    import shutil

    try:
        free = f"{shutil.disk_usage(out).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return (f"no space left on the filesystem of {out} ({free}) while writing the run ({type(e).__name__}); "
            f"nothing half-written was left, the newest complete checkpoint in {out}/checkpoints is intact: "
            f"free space and rerun the same command with --resume")


def _train(cfg: TrainConfig, info: DistInfo, device: torch.device) -> dict:
    run = build_run(cfg, info, device)
    cfg, out = run.cfg, run.out  # the per-rank batch may be rescaled (--keep-global-batch)
    if cfg.compile_warmup:
        warm_up(run)
    run_info = {"train": asdict(cfg), "hparams": run.hp.to_dict(), "model": run.mcfg.to_dict(),
                "world_size": info.world_size, "device": str(device), "devices": run.devices, "precision": run.precision,
                "peak_flops": run.peak, **({"compile": compile_record(run)} if cfg.compile else {})}
    resume_step = run.start if cfg.resume else None
    try:
        sinks = open_sinks(cfg.report_to, out, config=run_info, resume_step=resume_step,
                           wandb_project=cfg.wandb_project, enabled=info.is_main)
    except TrackingError as e:
        raise TrainError(str(e)) from None
    if info.is_main:  # before metrics.jsonl: a disk that cannot take run.json leaves no empty log either
        _write_json(out / "run.json", run_info)
    log = MetricsLog(out / "metrics.jsonl", resume_step=resume_step, enabled=info.is_main, sinks=sinks)
    from tqdm.auto import tqdm

    bar = tqdm(total=run.end, initial=run.start, disable=not (info.is_main and cfg.progress), desc="train",
               unit="step", dynamic_ncols=True)
    line = PeriodicLine(run.start, run.end, cfg.log_interval, enabled=info.is_main and not cfg.progress)
    stop = StopRequest()
    failure = None
    try:  # the handlers stay until the summary is written: a late repeat must not lose summary.json
        try:
            status = train_loop(run, log, bar, line, stop)
        except StepFailed as e:
            status, failure = "non_finite", str(e)
        finally:
            bar.close()
            log.close()
            for loader in (run.loader, getattr(run.validator, "loader", None)):   # their worker processes
                if hasattr(loader, "close"):
                    loader.close()
        return _finish(run, status, failure, stop)
    finally:
        stop.restore()


@dataclass
class Run:
    """One run as built by `build_run`: its settings, model, optimiser, loader and where it stands."""
    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    stage: str
    precision: str
    resolution: int | None
    hp: HParams
    model: AIMv2
    loss_module: nn.Module
    step_fn: nn.Module           # loss_module, or its torch.compile'd form
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    generator: torch.Generator   # prefix lengths
    loader: object
    sharded: bool
    start: int                   # steps done when this process started
    peak: float                  # FLOP/s of one device, for MFU
    header: dict = field(default_factory=dict)   # what the summary says about the run
    step: int = 0                # steps done so far
    saved: tuple[Path | None, int | None] = (None, None)   # newest checkpoint written or resumed, its step
    validator: Validator | None = None   # held-out losses (--val-manifest), validate.py
    replaced: int = 0            # samples replaced (unreadable) since this process started, all ranks
    params: list[torch.Tensor] | None = None   # trainable parameters (after wrapping), clipped each step; None: model's
    pad_id: int = 0              # the tokenizer's padding id (caption tokens not counted by the text loss)
    save_time: float | None = None   # seconds the newest checkpoint write took (size the scheduler's --signal by it)
    devices: list[dict] = field(default_factory=list)   # every rank's model and decoder device (rank_devices)
    text_len: int = TEXT_LEN     # caption tokens per sample (the tokenizer's), for --compile-warmup's batches
    compiled_from: dict | None = None   # --compile: this process's compile counts before the run compiled anything
    warmup: dict | None = None   # --compile-warmup: shapes run, seconds, and the compile counts when it ended

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def mcfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def end(self) -> int:
        return self.cfg.stop_at or self.cfg.steps

    def save(self) -> Path:
        t0 = time.perf_counter()
        tok_bytes = Path(self.cfg.tokenizer).read_bytes()
        train_meta = {"config": asdict(self.cfg), "hparams": self.hp.to_dict(), "schedule": self.schedule.state_dict(),
                      "world_size": self.info.world_size,
                      "parallel": self.cfg.parallel if self.info.enabled else "none", "stage": self.stage,
                      "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest()}
        path = ck.save_checkpoint(self.out / "checkpoints", self.step, self.model, self.optimizer,
                                  model_config=self.mcfg.to_dict(), train=train_meta,
                                  rank_state={"loader": self.loader.state_dict(), "rng": ck.rng_state(self.generator)},
                                  tokenizer_bytes=tok_bytes, sharded=self.sharded,
                                  keep=self.cfg.keep)
        self.saved, self.save_time = (path, self.step), round(time.perf_counter() - t0, 3)
        return path


def build_run(cfg: TrainConfig, info: DistInfo, device: torch.device) -> Run:
    """Settings, the resume decision, the model (initialised, wrapped, compiled), optimiser, schedule and
    loader, restored from the newest checkpoint when resuming."""
    stage = cfg.resolved_stage()
    precision = run_precision(cfg, device)
    resolution = run_resolution(cfg)
    hp: HParams = resolve(cfg.model, stage, cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr,
                          weight_decay=cfg.weight_decay, warmup=cfg.warmup, clip=cfg.clip)
    tok = Tokenizer(cfg.tokenizer)
    resume_from = _resume_point(cfg, info, tok)
    cfg = _batch_for_world(cfg, resume_from, info)

    model = build_model(cfg, tok, resolution or 224)
    init_note = load_init(model, cfg.init) if cfg.init and resume_from is None else None
    model.to(device)
    sharded = info.enabled and cfg.parallel == "fsdp"
    bf16_params = torch.bfloat16 if sharded and precision == "bf16" else None
    loss_module = wrap_model(LossModule(model, tok.pad_id), cfg.parallel, info, device, bf16_params)
    optimizer = build_optimizer(model, hp.peak_lr, hp.weight_decay, hp.betas, hp.eps)
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + info.rank)
    loader = make_loader(cfg, tok, info, resolution, model.cfg.encoder.patch_size, device)
    captioned, n_samples = caption_coverage(loader.table)
    if captioned == 0 and not cfg.allow_no_captions:
        raise TrainError(f"{cfg.manifest}: none of its {n_samples} samples has a caption, so the text loss would "
                         "train on empty captions; attach captions (`aimv2 caption attach`) or pass "
                         "--allow-no-captions")

    start = 0
    if resume_from is not None:
        path, state = resume_from
        ck.load_training_state(path, state, model, optimizer, sharded)
        # another world size (DDP / one process): rank 0's loader state carries the global data position and
        # the loader starts each source's next epoch there; ranks that did not exist keep their fresh RNGs
        same_world = len(state["ranks"]) == info.world_size
        mine = state["ranks"][info.rank if same_world else 0]
        loader.load_state_dict(mine["loader"])
        if same_world or info.rank < len(state["ranks"]):
            ck.set_rng_state(state["ranks"][info.rank]["rng"], generator)
        start = int(state["step"])
    step_fn = loss_module
    if cfg.compile:
        watch_compiles()
        compiled_from = compile_counts()  # the figures of this run's compiles are counted from here
        step_fn = compile_step(loss_module, model, cfg.native_res, cfg.compile_dynamic,
                               warmup_shapes(loader.sampler))
    if cfg.peak_flops:
        peak, peak_source = cfg.peak_flops, "--peak-flops"
    else:  # a stable reference, so MFU compares between runs (metrics.reference_peak)
        peak, peak_source = reference_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    run = Run(cfg, info, device, stage, precision, resolution, hp, model, loss_module, step_fn, optimizer,
              WarmupCosine(hp.peak_lr, hp.min_lr, hp.warmup, hp.steps), generator, loader, sharded, start, peak,
              step=start, saved=(resume_from[0], start) if resume_from else (None, None),
              validator=_validator(cfg, tok, info, device, precision, resolution),
              params=[p for p in model.parameters() if p.requires_grad], pad_id=tok.pad_id, text_len=tok.max_len,
              compiled_from=compiled_from if cfg.compile else None)
    run.devices = rank_devices(device, cfg.image_decoder, info)
    run.header = {**_header(run, init_note), "peak_source": peak_source}
    return run


def warm_up(run: Run) -> None:
    """--compile-warmup: forward and backward on a synthetic batch of each (grid, B) the sampler can draw
    (compiling.warmup_shapes: the same list, in the same order, on every rank), so every graph is compiled
    before step 0 and no rank compiles mid-run while the others wait at a collective. Batches as the loader's
    (uint8, channels-last, full-length captions) through `_accumulate`, so --grad-accum's micro-batches and DDP's
    hooks are the step's own; the gradients are dropped, there is no update and the run's generator is not used,
    so the training that follows is the one without it."""
    shapes = warmup_shapes(run.loader.sampler, one_per_area=compile_dynamic(run.cfg.compile_dynamic))
    g = torch.Generator().manual_seed(0)
    p, vocab = run.mcfg.encoder.patch_size, run.mcfg.decoder.vocab_size
    t0 = time.perf_counter()
    for (h, w), B in shapes:
        images = torch.randint(0, 256, (B, h * p, w * p, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
        tokens = torch.randint(0, vocab, (B, run.text_len), generator=g)
        batch = Batch(images, (h, w), p, [""] * B, [""] * B, [""] * B, tokens).to(run.device)
        _accumulate(run, batch, sample_prefix_lengths(B, h * w, g).to(run.device))
        run.optimizer.zero_grad(set_to_none=True)
    run.warmup = {"shapes": len(shapes), "seconds": round(time.perf_counter() - t0, 2), "counts": compile_counts()}


def compile_record(run: Run) -> dict:
    """What --compile cost this rank so far: graphs, recompiles and compile seconds (compiling.compile_counts),
    and with --compile-warmup the warm-up's shapes and wall seconds and what compiled after it (0 and 0: nothing
    mid-run)."""
    native = run.cfg.native_res
    rec = {"scope": "blocks" if native else "model",
           "dynamic": compile_dynamic(run.cfg.compile_dynamic) if native else False,
           **counts_since(run.compiled_from)}
    if run.warmup is not None:
        after = counts_since(run.warmup["counts"])
        rec.update(warmup_shapes=run.warmup["shapes"], warmup_seconds=run.warmup["seconds"],
                   graphs_after_warmup=after["graphs"], recompiles_after_warmup=after["recompiles"])
    return rec


def _batch_for_world(cfg: TrainConfig, resume_from, info: DistInfo) -> TrainConfig:
    """Resuming at another world size: the global batch (the paper's schedule is per global step) changes with
    the ranks unless --keep-global-batch scales the per-rank batch by old ranks / new ranks; a notice says which."""
    if resume_from is None:
        return cfg
    train = resume_from[1].get("train", {})
    old_world, new_world = int(train.get("world_size", 1)), info.world_size
    key, unit = ("batch_patches", "patches") if cfg.native_res else ("batch_size", "images")
    flag_name = "--" + key.replace("_", "-")
    old = int(train.get("config", {}).get(key, getattr(cfg, key)))
    if old_world == new_world:  # --keep-global-batch: the checkpoint's per-rank batch, whatever was passed
        return replace(cfg, **{key: old}) if cfg.keep_global_batch else cfg
    if not cfg.keep_global_batch:
        if info.is_main:
            notice(f"--resume: {resume_from[0]} was written by {old_world} rank(s), this run has {new_world}: the "
                   f"global batch changes from {old * old_world} to {getattr(cfg, key) * new_world} {unit} per step "
                   f"({flag_name} {getattr(cfg, key)} per rank); pass --keep-global-batch to keep {old * old_world}")
        return cfg
    if (old * old_world) % new_world:
        raise TrainError(f"--keep-global-batch: the checkpoint's global batch of {old * old_world} {unit} "
                         f"({old_world} x {old}) does not divide among {new_world} ranks: use a world size that "
                         f"divides it, or drop --keep-global-batch")
    per_rank = old * old_world // new_world
    if info.is_main:
        notice(f"--resume at {new_world} rank(s) (was {old_world}): --keep-global-batch keeps {old * old_world} "
               f"{unit} per step, {flag_name} {old} -> {per_rank} per rank")
    return replace(cfg, **{key: per_rank})


def _resume_point(cfg: TrainConfig, info: DistInfo, tok: Tokenizer) -> tuple[Path, dict] | None:
    """Where the run starts: None (fresh) or the newest complete checkpoint (--resume)."""
    ckpt_dir = Path(cfg.out) / "checkpoints"
    if problem := existing_run(cfg.out, cfg.resume):
        raise TrainError(problem)
    resume_from = None
    if cfg.resume:
        try:  # a damaged newest checkpoint: the newest intact one, with a notice; none intact: refuse
            resume_from = ck.resume_checkpoint(ckpt_dir, notify=notice)  # rank 0 verifies, broadcasts
        except ck.NoIntactCheckpoint as e:
            raise TrainError(f"{e}; nothing was changed: restore a good copy into {ckpt_dir}, or start a new run "
                             "with another -o/--output") from None
    if resume_from is not None:
        _check_resumable(cfg, resume_from, info, tok)
    return resume_from


def _header(run: Run, init_note: str | None) -> dict:
    cfg, info = run.cfg, run.info
    hp = run.hp
    return {"model": f"{preset_name(cfg.model)} ({count_params(run.model) / 1e6:.2f}M params incl. decoder)",
            "stage": run.stage, "data": (f"native resolution, {cfg.batch_patches} patches/rank/step" if cfg.native_res
                                         else f"{run.resolution} px, {cfg.batch_size} images/rank/step"),
            "world": f"{info.world_size} x {run.device.type} ({cfg.parallel if info.enabled else 'single process'})",
            "precision": run.precision, "lr": f"{hp.peak_lr:g} peak, {hp.warmup} warmup, cosine to {hp.min_lr:g}",
            "weight_decay": hp.weight_decay, "resumed_from": run.start or None, "init": init_note,
            "peak_flops": run.peak, "devices": _devices_line(run.devices)}


def _devices_line(devices: list[dict]) -> str:
    """'rank 0: model cuda:0, decoder dali on cuda:0; ...' (ranks alike on one line each: a run of 64 stays short)."""
    return "; ".join(f"rank {d['rank']}: model {d['model']}, decoder {d['decoder']}" for d in devices[:8]) + (
        f"; ... ({len(devices)} ranks, all in run.json)" if len(devices) > 8 else "")


class StepFailed(Exception):
    """The loss or the gradient norm of a step is not finite; nothing of the step was applied."""


def train_step(run: Run, batch, stop: StopRequest) -> dict:
    """One optimiser step (run.step -> run.step + 1) on a batch already on the device, as `--grad-accum`
    micro-batches. Returns the named loss terms (`loss` and the model's LOSS_TERMS, each the whole batch's,
    mean over ranks), `lr`, `grad_norm`, `images`, `patches`, `flops` (model FLOPs) and
    `replaced` (replaced samples; `replaced_unreachable` and `replaced_damaged` split it by
    why), each summed over ranks, and `stop`
    (some rank was asked to stop, read after backward: a signal during this step stops after it). Raises
    StepFailed, with nothing applied, on a non-finite loss or gradient norm.

    The host waits for the device once: one small tensor of everything logged, read after backward and
    clipping, before the optimiser step (which runs only on finite values); nothing else syncs."""
    h, w = batch.grid
    prefix = sample_prefix_lengths(batch.images.shape[0], h * w, run.generator)  # the whole batch's, then split
    prefix = prefix.to(batch.images.device, non_blocking=True)  # a blocking copy would wait for the device
    lr = run.schedule.apply(run.optimizer, run.step)
    logged = _accumulate(run, batch, prefix)
    params = run.params if run.params is not None else [p for p in run.model.parameters() if p.requires_grad]
    norm = _grad_norm(params, run.hp.clip)
    # the loss terms, this rank's images, patches and model FLOPs (ranks draw different grids at native
    # resolution: throughput and MFU sum them), the replaced-sample counts by kind and "a rank was asked to stop" travel
    # in one all-reduce, so all ranks decide alike; counts are means there, summed back (exact in float64)
    B = batch.images.shape[0]
    flops = step_flops(run.mcfg, (h, w), B, 0 if batch.tokens is None else batch.tokens.shape[1]).train
    kinds = [replaced_kind(reason) for _, reason in getattr(batch, "replaced", ())]
    host = torch.tensor([B, B * h * w, flops, *(kinds.count(k) for k in REPLACED_KINDS), stop.requested],
                        dtype=torch.float64)
    host = host.to(norm.device, non_blocking=True)  # torch.tensor(x, device=cuda) would wait for the device
    reduced = all_reduce_mean(torch.cat([torch.stack(list(logged.values())).double(), host]), run.info)
    values = torch.cat([reduced, norm.detach().reshape(1).double()]).tolist()  # the step's one host sync
    losses, grad_norm = dict(zip(logged, values[:len(logged)])), values[-1]
    world, n = run.info.world_size, len(logged)
    counts = {f"replaced_{k}": int(round(v * world)) for k, v in zip(REPLACED_KINDS, values[n + 3:-2])}
    if not all(math.isfinite(v) for v in losses.values()):
        run.optimizer.zero_grad(set_to_none=True)
        raise StepFailed(f"step {run.step + 1}: the loss is not finite ("
                         + ", ".join(f"{k}={v}" for k, v in losses.items()) + ")")
    if not math.isfinite(grad_norm):
        run.optimizer.zero_grad(set_to_none=True)
        raise StepFailed(f"step {run.step + 1}: the gradient norm is {grad_norm} (loss {losses[TOTAL_LOSS]:.4f})")
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {"losses": losses, "lr": lr, "grad_norm": grad_norm,
            "images": int(round(values[n] * world)), "patches": int(round(values[n + 1] * world)),
            "flops": values[n + 2] * world,
            **counts, "replaced": sum(counts.values()), "stop": values[-2] > 0}


def _accumulate(run: Run, batch, prefix: torch.Tensor) -> dict[str, torch.Tensor]:
    """Forward and backward over the batch in `--grad-accum` micro-batches; gradients add up to the whole
    batch's (each micro-batch's terms weighted by its share of the batch's targets, model.target_counts: native
    resolution's captions differ in length). Returns the whole batch's loss terms, detached, on the device."""
    images, patches, tokens = batch.images, batch.patches, batch.tokens
    parts = min(run.cfg.grad_accum, images.shape[0])
    if parts == 1:
        with autocast_context(run.device, run.precision):
            terms = run.step_fn(images, patches, tokens, prefix)
        terms[TOTAL_LOSS].backward()
        return {k: t.detach() for k, t in terms.items()}
    split = [torch.tensor_split(x, parts) if x is not None else [None] * parts for x in (images, patches, tokens)]
    chunks = list(zip(*split, torch.tensor_split(prefix, parts)))
    n_patches = images.shape[2] * images.shape[3] // run.mcfg.encoder.patch_size ** 2
    counts = [run.model.target_counts(tok, pre, n_patches, run.pad_id) for _, _, tok, pre in chunks]
    totals = {k: sum(c[k] for c in counts) for k in LOSS_TERMS}
    logged = None
    for i, ((img, pat, tok, pre), count) in enumerate(zip(chunks, counts)):
        weights = {k: count[k].float() / totals[k].clamp(min=1) for k in LOSS_TERMS}
        with _grad_sync(run, i == parts - 1), autocast_context(run.device, run.precision):
            terms = run.step_fn(img, pat, tok, pre, weights)
            terms[TOTAL_LOSS].backward()
        part = {TOTAL_LOSS: terms[TOTAL_LOSS].detach(), **{k: weights[k] * terms[k] for k in LOSS_TERMS}}
        logged = part if logged is None else {k: logged[k] + part[k] for k in part}
    return logged


def _grad_sync(run: Run, last: bool):
    """DDP reduces gradients on the last micro-batch only (`no_sync` before it). FSDP2 reduce-scatters every
    micro-batch: it then keeps sharded gradients only, which is what it is for."""
    if last or not isinstance(run.loss_module, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return run.loss_module.no_sync()


def train_loop(run: Run, log: MetricsLog, bar, line: PeriodicLine, stop: StopRequest) -> str:
    """Steps until run.end (or a stop request): log each, checkpoint every --save-every, at the end and
    when stopped. Returns the status: done, stopped (--stop-at) or interrupted."""
    cfg = run.cfg
    batches = _endless(run.loader)
    t_prev = time.perf_counter()
    while run.step < run.end:
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        batch = batch.to(run.device, non_blocking=True)  # patches are then cut on the device
        result = train_step(run, batch, stop)
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        rec = _record(run, batch, result, dt, t_data)
        if run.validator is not None and (run.step == run.end or (cfg.val_every and run.step % cfg.val_every == 0)):
            rec.update(run.validator(run.model))
            t_prev = time.perf_counter()  # validation is not part of the next step's time
        log.write(rec)
        run.replaced += rec["replaced"]
        _show(bar, rec, run.replaced)
        line.update(run.step, rec, run.replaced)
        if run.step == run.end or result["stop"] or (cfg.save_every and run.step % cfg.save_every == 0):
            with stop.saving():  # a repeated signal must not abort the checkpoint it asked for (preempt.py)
                run.save()
            t_prev = time.perf_counter()  # the save is not part of the next step's time
        if result["stop"]:
            return "interrupted"
    return "done" if run.end == cfg.steps else "stopped"


def _endless(loader):
    """The loader's batches, pass after pass (each iter() is one loader segment)."""
    while True:
        yield from loader


def _record(run: Run, batch, result: dict, dt: float, t_data: float) -> dict:
    """One line of metrics.jsonl: the step, its loss terms, lr, grad norm, throughput and MFU."""
    h, w = batch.grid  # this rank's; images, patches and FLOPs are all ranks' (native: each rank its own grid)
    images = result["images"]
    return {"step": run.step, **result["losses"], "lr": result["lr"], "grad_norm": result["grad_norm"],
            "images_per_s": images / dt, "patches_per_s": result["patches"] / dt,
            "mfu": mfu(result["flops"], dt, run.peak, run.info.world_size),
            "step_time": dt, "data_time": t_data, "batch": images, "patches": result["patches"], "grid": [h, w],
            "source_epoch": int(batch.source_epoch),
            "sources": dict(run.loader.stats["sources"]), "source_epochs": run.loader.source_epochs(),
            "caption_shares": caption_shares(run.loader.stats.get("captions", {})),
            **{k: result[k] for k in ("replaced", *(f"replaced_{k}" for k in REPLACED_KINDS))}}


def _show(bar, rec: dict, replaced: int) -> None:
    terms = {short: f"{rec[k]:.3f}" for k, (short, _) in LOSS_TERMS.items() if k in rec}
    bar.update(1)
    bar.set_postfix(loss=f"{rec[TOTAL_LOSS]:.4f}", **terms, lr=f"{rec['lr']:.2e}", mfu=f"{100 * rec['mfu']:.1f}%",
                    repl=replaced, refresh=False)


def _finish(run: Run, status: str, failure: str | None, stop: StopRequest) -> dict:
    """The run summary (RUN/summary.json on rank 0); raises NonFiniteLoss after writing it on failure."""
    info, out = run.info, run.out
    metrics = out / "metrics.jsonl"
    records = read_jsonl(metrics) if info.is_main and metrics.is_file() else []
    saved_path, last_saved = run.saved
    summary = {"status": status, "rank": info.rank, "step": run.step, "steps": run.cfg.steps,
               "checkpoint": str(saved_path) if saved_path else None, "last_good_step": last_saved,
               "save_time": run.save_time,
               "run": str(out), **run.header, **summarize(records),
               **replaced_summary(records, run.loader.stats["replaced_keys"], run.cfg.warn_replaced),
               "caption_shares": records[-1].get("caption_shares") if records else None,
               **({"compile": compile_record(run)} if run.compiled_from is not None else {})}
    if info.is_main and summary.get("replaced_warning"):
        notice("warning: " + summary["replaced_warning"])
    if status == "interrupted":  # 130 / 143: a scheduler requeues, `train && export` stops (preempt.py)
        summary.update(signal=stop.signal_name or "SIGTERM", exit_code=stop.exit_code or 143)
    if info.is_main:
        _write_json(out / "summary.json", summary)
    if failure:
        where = (f"the last good checkpoint is {saved_path} (step {last_saved}); continue from it with "
                 f"--resume and a lower --lr" if saved_path else "no checkpoint was written before it")
        raise NonFiniteLoss(f"{failure}: stopping, nothing of this step was applied; {where}.")
    return summary


def _check_resumable(cfg: TrainConfig, resume_from, info: DistInfo, tok: Tokenizer) -> None:
    path, state = resume_from
    train = state.get("train", {})
    old = train.get("config", {})
    if train.get("world_size", 1) != info.world_size and "fsdp" in (train.get("parallel"), cfg.parallel):
        raise TrainError(f"{path} was written by {train.get('world_size')} ranks with FSDP, this run has "
                         f"{info.world_size}: resume FSDP runs with the same number of processes (DDP and single-"
                         f"process runs may change it)")
    mode = cfg.parallel if info.enabled else "none"
    if train.get("parallel", "none") != mode and "fsdp" in (train.get("parallel"), mode):
        raise TrainError(f"{path} was written with parallel={train.get('parallel')}, this run uses {mode}")
    rescaled = cfg.keep_global_batch  # the per-rank batch comes from the checkpoint (_batch_for_world)
    for key in ("model", "native_res", "resolution", "batch_size", "batch_patches", "seed", "stage"):
        if rescaled and key in ("batch_size", "batch_patches"):
            continue
        if key in old and old[key] != getattr(cfg, key):
            raise TrainError(f"--resume: {key} was {old[key]!r} in {path}, now {getattr(cfg, key)!r}; "
                             f"resume with the same settings (or start a new --output with --init {path})")
    if state.get("config", {}).get("decoder", {}).get("vocab_size") != tok.vocab_size:
        raise TrainError(f"--resume: the tokenizer has {tok.vocab_size} ids, the checkpoint's model "
                         f"{state['config']['decoder']['vocab_size']}")
    _check_tokenizer(path, state, tok)
    if old.get("steps") not in (None, cfg.steps):
        warnings.warn(f"--steps changed from {old['steps']} to {cfg.steps}: the cosine schedule is stretched "
                      f"from here on, so this is not the run that was interrupted", stacklevel=3)
    if int(state["step"]) >= (cfg.stop_at or cfg.steps):
        raise TrainError(f"{path} is at step {state['step']}, nothing left to do for --steps {cfg.steps}"
                         + (f" --stop-at {cfg.stop_at}" if cfg.stop_at else ""))


def _check_tokenizer(path: Path, state: dict, tok: Tokenizer) -> None:
    """Another tokenizer of the same size maps ids to other pieces: compare content hashes. Checkpoints written
    before the hash was stored carry the tokenizer's bytes, hashed here; one with neither is accepted, with a
    notice."""
    saved = state.get("train", {}).get("tokenizer_sha256")
    if saved is None and isinstance(state.get("tokenizer"), torch.Tensor):
        saved = hashlib.sha256(state["tokenizer"].numpy().tobytes()).hexdigest()
    if saved is None:
        notice(f"--resume: {path} does not record its tokenizer; assuming {tok.path} is the one it was trained with")
    elif saved != tok.sha256:
        raise TrainError(f"--resume: {tok.path} is not the tokenizer {path} was trained with (sha256 "
                         f"{tok.sha256[:12]}, the checkpoint's {saved[:12]}): its ids stand for other pieces; pass "
                         f"the run's own tokenizer or start a new --output with --init {path}")


def _write_json(path: Path, obj: dict) -> None:
    write_json_atomic(obj, path, indent=2, default=str)
