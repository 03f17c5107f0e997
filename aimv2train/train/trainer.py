"""The training loop: `train(TrainConfig) -> summary`.

One optimiser step = one loader batch per rank -> prefix lengths from a seeded CPU generator ->
L_text + alpha * L_img under autocast -> backward -> clip to 1.0 -> fully decoupled AdamW with the
warmup-cosine rate. Everything a step depends on (weights, optimiser moments, schedule step, loader
position, RNG states) is in the checkpoint, so `--resume` continues the same run: on CPU its losses
are identical to an uninterrupted run's.

The loss is evaluated inside `LossModule.forward` so that DDP's gradient hooks and torch.compile
both see it (both only act through `forward`).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from aimv2data.atomic import atomic_write, is_disk_full

from . import checkpoint as ck
from ..model.config import ModelConfig, model_config, preset_name
from .distributed import DistInfo, all_reduce_mean, init_distributed, pick_device, shutdown, wrap_model
from ..model.flops import step_flops
from ..model.masks import sample_prefix_lengths
from .metrics import MetricsLog, read_records, reference_peak, summarize
from ..model.aimv2 import AIMv2, count_params
from .optim import build_optimizer
from ..model.posemb import resize_learned
from .health import caption_coverage, global_count, replaced_summary
from .logline import PeriodicLine
from .preempt import StopRequest, notice
from .presets import STAGES, HParams, resolve
from .schedule import WarmupCosine
from .tokenizer import Tokenizer


class TrainError(RuntimeError):
    """A run that cannot start or continue; the message says what and what to do."""


class NonFiniteLoss(TrainError):
    """The loss or the gradient norm became inf/nan; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    manifest: str
    tokenizer: str
    out: str
    model: str = "tiny"
    steps: int = 1000
    stage: str | None = None  # pretrain | highres | native; None: native if native_res else pretrain
    native_res: bool = False
    batch_patches: int = 65536  # per rank, native resolution (32 ranks x 65536 / 256 = 8192 images at 224 px)
    resolution: int | None = None  # fixed resolution; None: the stage's (224 / 336)
    batch_size: int = 256  # per rank, fixed resolution (32 ranks x 256 = Table A1's 8192)
    init: str | None = None
    resume: bool = False
    stop_at: int | None = None
    seed: int = 0
    device: str | None = None  # None: cuda if available else cpu
    workers: int = 4
    decoder: str = "pil"
    compile: bool = False
    precision: str | None = None  # None: bf16 on cuda, fp32 on cpu
    parallel: str = "ddp"  # ddp | fsdp (under torchrun)
    lr: float | None = None
    min_lr: float | None = None
    warmup: int | None = None
    weight_decay: float | None = None
    clip: float | None = None
    save_every: int = 1000
    keep: int = 2
    grad_checkpointing: bool = False
    progress: bool = True
    peak_flops: float | None = None  # MFU reference, FLOP/s per device (None: metrics.reference_peak)
    warn_replaced: float = 0.02  # warn when more than this share of draws were replacements (health.py)
    allow_no_captions: bool = False  # train on a manifest without a single caption (text loss on empty ones)
    log_interval: float = 60.0  # with progress=False: one log line every this many seconds (0: none)

    def resolved_stage(self) -> str:
        return self.stage or ("native" if self.native_res else "pretrain")


# ------------------------------------------------------------------------------------- building blocks

class LossModule(nn.Module):
    """forward(images, patches, tokens, prefix_len) -> (loss, loss_img, loss_text)."""

    def __init__(self, model: AIMv2, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, images, patches, tokens, prefix_len):
        loss, parts = self.model.training_loss(images, patches, tokens, self.pad_id, prefix_len=prefix_len)
        return loss, parts["loss_img"], parts["loss_text"]


def _check(cfg: TrainConfig) -> None:
    stage = cfg.resolved_stage()
    if stage not in STAGES:
        raise TrainError(f"--stage {stage!r} is not one of {list(STAGES)}")
    st = STAGES[stage]
    if st.native and not cfg.native_res:
        raise TrainError("--stage native trains at native resolution: add --native-res --batch-patches C")
    if stage == "highres" and cfg.native_res:
        raise TrainError("--stage highres is a fixed-resolution stage (--resolution 336|448); drop --native-res")
    if st.needs_init and not cfg.init:
        raise TrainError(f"--stage {stage} fine-tunes a pre-trained model: pass --init CHECKPOINT "
                         f"(a run directory, a checkpoint .pt, a transformers folder or ml-aim weights)")
    if cfg.stop_at is not None and not 0 < cfg.stop_at <= cfg.steps:
        raise TrainError(f"--stop-at {cfg.stop_at} must be in [1, --steps {cfg.steps}]")
    if cfg.save_every < 0:
        raise TrainError(f"--save-every must be >= 0 (0: only at the end / --stop-at), got {cfg.save_every}")
    if cfg.precision not in (None, "bf16", "fp32"):
        raise TrainError(f"--precision must be bf16 or fp32, got {cfg.precision!r}")
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
                             ("--keep", cfg.keep, 0)):
        if value < low:
            raise TrainError(f"{flag} must be >= {low}, got {value}")
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
    return model


def _init_state_dict(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights for --init: the full model from one of our checkpoints (file, checkpoints dir or run dir),
    else the encoder from anything interop.load_encoder reads (transformers folder, ml-aim weights)."""
    p = Path(path)
    if not p.exists():
        raise TrainError(f"--init {path} does not exist")
    candidates = []
    if p.is_dir():
        d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        candidates = [f for _, f in reversed(ck.list_checkpoints(d))]
    elif p.suffix in (".pt", ".pth"):
        candidates = [p]
    for f in candidates:
        try:
            state = ck.read_checkpoint(f)
        except ValueError:
            continue
        sd = state.get("model") if isinstance(state, dict) else None
        if isinstance(sd, dict) and "encoder.patch_embed.proj.weight" in sd:
            return sd, f"{f} (full model, step {state.get('step', '?')})"
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
    sd = dict(sd)
    own = model.state_dict()
    notes = []
    if "encoder.pos_embed" in sd:
        if "encoder.pos_embed" not in own:
            del sd["encoder.pos_embed"]
            notes.append("learned position table dropped (sin-cos model)")
        elif sd["encoder.pos_embed"].shape != own["encoder.pos_embed"].shape:
            old_n, new_n = sd["encoder.pos_embed"].shape[1], own["encoder.pos_embed"].shape[1]
            old, new = (math.isqrt(old_n),) * 2, model.cfg.encoder.grid
            if old[0] * old[1] != old_n:
                raise TrainError(f"--init {path}: position table of {old_n} entries is not a square grid")
            sd["encoder.pos_embed"] = resize_learned(sd["encoder.pos_embed"], old, new)
            notes.append(f"position table resampled {old[0]}x{old[1]} -> {new[0]}x{new[1]} (bicubic)")
    for key in ("decoder.token_embed.weight", "text_head.weight"):
        if key in sd and sd[key].shape != own[key].shape:
            raise TrainError(f"--init {path}: its text vocabulary has {sd[key].shape[0]} ids, the tokenizer "
                             f"{own[key].shape[0]}: train with the tokenizer of the run you start from")
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


def make_loader(cfg: TrainConfig, tok: Tokenizer, info: DistInfo, resolution: int | None, patch_size: int):
    """This rank's loader (its slice of every global batch, captions tokenized by `tok`); one epoch per
    iter(), resumable through state_dict()."""
    from aimv2data.loader import Loader

    kwargs = dict(tokenizer=tok, pad_id=tok.pad_id, rank=info.rank, world_size=info.world_size, seed=cfg.seed,
                  workers=cfg.workers, decoder=cfg.decoder, pin_memory=torch.cuda.is_available())
    if cfg.native_res:
        loader = Loader(cfg.manifest, native_res=True, batch_patches=cfg.batch_patches, **kwargs)
    else:
        loader = Loader(cfg.manifest, resolution=resolution, batch_size=cfg.batch_size, **kwargs)
    if loader.patch_size != patch_size:
        raise TrainError(f"the manifest {cfg.manifest} was bucketed for patch size {loader.patch_size}, the model "
                         f"uses {patch_size}: rebuild it with `aimv2 shard --patch-size {patch_size}`")
    return loader


def autocast_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _grad_norm(params: list[torch.Tensor], clip: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


# ------------------------------------------------------------------------------------------ the run

def train(cfg: TrainConfig) -> dict:
    """Train (or resume) the run `cfg.out`; returns the summary (also written to RUN/summary.json).

    Raises TrainError for bad input and NonFiniteLoss when the loss diverges. Under torchrun every
    rank calls this; rank 0 writes metrics, checkpoints and the summary."""
    _check(cfg)
    device = pick_device(cfg.device)
    info = init_distributed(device)
    try:
        return _train(cfg, info, device)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise TrainError(_disk_full_message(cfg.out, e)) from None
    finally:
        shutdown()


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
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    stage = cfg.resolved_stage()
    precision = cfg.precision or ("bf16" if device.type == "cuda" else "fp32")
    resolution = None if cfg.native_res else (cfg.resolution or STAGES[stage].resolution)
    hp: HParams = resolve(cfg.model, stage, cfg.steps, lr=cfg.lr, min_lr=cfg.min_lr,
                          weight_decay=cfg.weight_decay, warmup=cfg.warmup, clip=cfg.clip)
    tok = Tokenizer(cfg.tokenizer)

    # where the run starts: fresh, or the newest complete checkpoint
    resume_from = None
    existing = ck.list_checkpoints(ckpt_dir)
    if existing and not cfg.resume:
        raise TrainError(f"{out} already holds a run (newest checkpoint {existing[-1][1].name}): pass --resume "
                         f"to continue it or choose another --out")
    if cfg.resume:
        try:  # a damaged newest checkpoint: the newest intact one, with a notice; none intact: refuse
            resume_from = ck.latest_checkpoint(ckpt_dir, notify=notice)
        except ck.NoIntactCheckpoint as e:
            raise TrainError(str(e)) from None
    if resume_from is not None:
        _check_resumable(cfg, resume_from, info, tok)

    model = build_model(cfg, tok, resolution or 224)
    init_note = None
    if cfg.init and resume_from is None:
        init_note = load_init(model, cfg.init)
    mcfg: ModelConfig = model.cfg
    model.to(device)
    sharded = info.enabled and cfg.parallel == "fsdp"
    bf16_params = torch.bfloat16 if sharded and precision == "bf16" else None
    loss_module = wrap_model(LossModule(model, tok.pad_id), cfg.parallel, info, device, bf16_params)
    optimizer = build_optimizer(model, hp.peak_lr, hp.weight_decay, hp.betas, hp.eps)
    schedule = WarmupCosine(hp.peak_lr, hp.min_lr, hp.warmup, hp.steps)
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + info.rank)  # prefix lengths
    loader = make_loader(cfg, tok, info, resolution, mcfg.encoder.patch_size)
    captioned, n_samples = caption_coverage(loader.table)
    if captioned == 0 and not cfg.allow_no_captions:
        raise TrainError(f"{cfg.manifest}: none of its {n_samples} samples has a caption, so the text loss would "
                         "train on empty captions; attach captions (`aimv2 caption attach`) or pass "
                         "--allow-no-captions")

    start = 0
    if resume_from is not None:
        path, state = resume_from
        ck.load_training_state(path, state, model, optimizer, sharded)
        mine = state["ranks"][info.rank]
        loader.load_state_dict(mine["loader"])
        ck.set_rng_state(mine["rng"], generator)
        start = int(state["step"])
    step_fn = torch.compile(loss_module, dynamic=cfg.native_res or None) if cfg.compile else loss_module

    if cfg.peak_flops:
        peak, peak_source = cfg.peak_flops, "--peak-flops"
    else:  # a stable reference, so MFU compares between runs (metrics.reference_peak)
        peak, peak_source = reference_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    end = cfg.stop_at or cfg.steps
    if info.is_main:  # before metrics.jsonl: a disk that cannot take run.json leaves no empty log either
        _write_json(out / "run.json", {"train": asdict(cfg), "hparams": hp.to_dict(), "model": mcfg.to_dict(),
                                         "world_size": info.world_size, "device": str(device),
                                         "precision": precision, "peak_flops": peak})
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if cfg.resume else None, enabled=info.is_main)
    train_meta = {"config": asdict(cfg), "hparams": hp.to_dict(), "schedule": schedule.state_dict(),
                  "world_size": info.world_size, "parallel": cfg.parallel if info.enabled else "none",
                  "stage": stage}

    def save(step: int) -> Path:
        return ck.save_checkpoint(ckpt_dir, step, model, optimizer, model_config=mcfg.to_dict(),
                                  train=train_meta, rank_state={"loader": loader.state_dict(),
                                                                "rng": ck.rng_state(generator)},
                                  tokenizer_bytes=Path(cfg.tokenizer).read_bytes(), sharded=sharded,
                                  keep=cfg.keep)

    header = {"model": f"{preset_name(cfg.model)} ({count_params(model) / 1e6:.2f}M params incl. decoder)",
              "stage": stage, "data": (f"native resolution, {cfg.batch_patches} patches/rank/step" if cfg.native_res
                                       else f"{resolution} px, {cfg.batch_size} images/rank/step"),
              "world": f"{info.world_size} x {device.type} ({cfg.parallel if info.enabled else 'single process'})",
              "precision": precision, "lr": f"{hp.peak_lr:g} peak, {hp.warmup} warmup, cosine to {hp.min_lr:g}",
              "weight_decay": hp.weight_decay, "resumed_from": start or None, "init": init_note,
              "peak_flops": peak, "peak_source": peak_source}

    from tqdm.auto import tqdm

    bar = tqdm(total=end, initial=start, disable=not (info.is_main and cfg.progress), desc="train",
               unit="step", dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    status = "done" if end == cfg.steps else "stopped"
    failure = None
    saved_path, last_saved = (resume_from[0], start) if resume_from else (None, None)
    loss_module.train()
    step = start
    batches = iter(loader)
    t_prev = time.perf_counter()
    replaced_total = 0
    line = PeriodicLine(start, end, cfg.log_interval, enabled=info.is_main and not cfg.progress)
    stop = StopRequest()
    try:
        while step < end:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:  # the loader ended its pass: start the next
                batches = iter(loader)
                batch = next(batches)
            t_data = time.perf_counter() - t0
            batch = batch.to(device, non_blocking=True)  # patches are then cut on the device
            images, patches, tokens = batch.images, batch.patches, batch.tokens
            B = images.shape[0]
            h, w = batch.grid
            prefix = sample_prefix_lengths(B, h * w, generator)
            lr = schedule.apply(optimizer, step)
            with autocast_context(device, precision):
                loss, loss_img, loss_text = step_fn(images, patches, tokens, prefix)
            # the losses and "a rank was asked to stop" travel in one all-reduce, so all ranks decide alike
            flag = torch.tensor(float(stop.requested), device=loss.device)
            logged = all_reduce_mean(torch.stack([loss.detach(), loss_img, loss_text, flag]).float(), info).tolist()
            if not all(math.isfinite(v) for v in logged[:3]):
                failure = (f"step {step + 1}: the loss is not finite (loss={logged[0]}, loss_img={logged[1]}, "
                           f"loss_text={logged[2]})")
                break
            loss.backward()
            grad_norm = _grad_norm(params, hp.clip)
            if not math.isfinite(grad_norm):
                failure = f"step {step + 1}: the gradient norm is {grad_norm} (loss {logged[0]:.4f})"
                break
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            flops = step_flops(mcfg, (h, w), B, 0 if tokens is None else tokens.shape[1]).train
            rec = {"step": step, "loss": logged[0], "loss_img": logged[1], "loss_text": logged[2], "lr": lr,
                   "grad_norm": grad_norm, "images_per_s": B * info.world_size / dt,
                   "patches_per_s": B * h * w * info.world_size / dt, "mfu": flops / dt / peak,
                   "step_time": dt, "data_time": t_data, "batch": B * info.world_size, "grid": [h, w],
                   "epoch": int(getattr(batch, "epoch", 0)),
                   "replaced": global_count(len(getattr(batch, "replaced", ())), info, device)}
            replaced_total += rec["replaced"]
            log.write(rec)
            bar.update(1)
            line.update(step, rec, replaced_total)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img=f"{rec['loss_img']:.3f}", txt=f"{rec['loss_text']:.3f}",
                            lr=f"{lr:.2e}", mfu=f"{100 * rec['mfu']:.1f}%", repl=replaced_total,
                            refresh=False)
            interrupted = logged[3] > 0
            if step == end or interrupted or (cfg.save_every and step % cfg.save_every == 0):
                saved_path, last_saved = save(step), step
                t_prev = time.perf_counter()  # the save is not part of the next step's time
            if interrupted:
                status = "interrupted"
                break
    finally:
        stop.restore()
        bar.close()
        log.close()

    records = _read_records(out / "metrics.jsonl") if info.is_main else []
    summary = {"status": "non_finite" if failure else status, "rank": info.rank, "step": step, "steps": cfg.steps,
               "checkpoint": str(saved_path) if saved_path else None, "last_good_step": last_saved,
               "run": str(out), **header, **summarize(records),
               **replaced_summary(records, loader.stats["replaced_keys"], cfg.warn_replaced)}
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
    if train.get("world_size", 1) != info.world_size:
        raise TrainError(f"{path} was written by {train.get('world_size')} ranks, this run has {info.world_size}: "
                         f"resume with the same number of processes (each rank resumes its own data slice)")
    mode = cfg.parallel if info.enabled else "none"
    if train.get("parallel", "none") != mode and "fsdp" in (train.get("parallel"), mode):
        raise TrainError(f"{path} was written with parallel={train.get('parallel')}, this run uses {mode}")
    for key in ("model", "native_res", "resolution", "batch_size", "batch_patches", "seed", "stage"):
        if key in old and old[key] != getattr(cfg, key):
            raise TrainError(f"--resume: {key} was {old[key]!r} in {path}, now {getattr(cfg, key)!r}; "
                             f"resume with the same settings (or start a new --out with --init {path})")
    if state.get("config", {}).get("decoder", {}).get("vocab_size") != tok.vocab_size:
        raise TrainError(f"--resume: the tokenizer has {tok.vocab_size} ids, the checkpoint's model "
                         f"{state['config']['decoder']['vocab_size']}")
    if old.get("steps") not in (None, cfg.steps):
        warnings.warn(f"--steps changed from {old['steps']} to {cfg.steps}: the cosine schedule is stretched "
                      f"from here on, so this is not the run that was interrupted", stacklevel=3)
    if int(state["step"]) >= (cfg.stop_at or cfg.steps):
        raise TrainError(f"{path} is at step {state['step']}, nothing left to do for --steps {cfg.steps}"
                         + (f" --stop-at {cfg.stop_at}" if cfg.stop_at else ""))


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return read_records(path)


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # no temp file left on a full disk
