"""`TrainConfig`: every setting of a training run, defined once. Each field carries its command-line
help (and, where needed, its short name, choices or path kind) as dataclass metadata; `aimv2 train`'s
options are generated from these fields (cli/train.py), so a new flag is one field here, read where it
is used. Kept free of torch so `aimv2 --help` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aimv2data.loader.decoders import DECODERS, decoders_help, workers_help
from aimv2data.paper import TABLE2

from ..model.config import ATTENTION_KINDS

STAGE_NAMES = ("pretrain", "highres", "native")   # presets.STAGES defines each
PARALLEL_MODES = ("ddp", "fsdp")
COMPILE_DYNAMIC = ("auto", "true", "false")


REQUIRED = object()  # marker: the field has no default (a required flag)


def flag(default=None, help: str = "", **cli):
    """A field with its CLI description: help, and optionally short ("-m"), choices, path ("dir" |
    "existing" | "existing_dir" | "existing_file"), name (the flag when it is not the field's name:
    "--no-progress" for an inverted boolean, "--output" for `out`), old (older spellings of the flag: they
    still parse, with a notice naming the new one, cli/flags.py) or cli=False (not a command-line flag).
    `default` REQUIRED makes it a required field and flag."""
    meta = {"help": help, **cli}
    return field(metadata=meta) if default is REQUIRED else field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    manifest: str | None = flag(REQUIRED, "Manifest directory written by `aimv2 shard` (with captions attached); a local "
                         "path or a URL (s3://...).", short="-m")
    tokenizer: str | None = flag(REQUIRED, "sentencepiece .model (`aimv2 tokenizer train`, or any existing one, e.g. "
                          "SigLIP's).", short="-t", path="existing_file")
    # the flag is --output, as in every command; the field keeps its name so earlier run.json files still read
    out: str | None = flag(REQUIRED, "Output folder. The run directory: metrics.jsonl, checkpoints/, run.json, "
                           "summary.json.", short="-o", path="dir", name="--output", old=("--out",))
    model: str = flag("tiny", "Size preset: tiny | base | L | H | 1B | 3B (paper Table 1).")
    steps: int = flag(1000, "Steps to run. Optimiser steps: the length of the run (sets the schedule).")
    stage: str | None = flag(None, "pretrain (224 px); highres (336/448 px, weight decay 0, needs --init); native "
                             "(--native-res, sin-cos positions, needs --init). Default: native with --native-res, "
                             "else pretrain.", choices=STAGE_NAMES)
    native_res: bool = flag(False, "Native resolution. Per step an area A = 2^n patches (n from a truncated normal on "
                            "7..12) and B = C / A images.")
    # per rank; 32 ranks x 65536 / 256 = 8192 images at 224 px
    batch_patches: int = flag(65536, "C: patches per step per rank with --native-res (a power of two >= 4096).",
                              short="-C")
    resolution: int | None = flag(None, "Fixed resolution R in pixels. RandomResizedCrop to R x R; default 224, or "
                                  "336 for --stage highres.", short="-R")
    batch_size: int = flag(256, "Images per step per rank at fixed resolution. Table A1: 8192 in total.",
                           short="-B")
    init: str | None = flag(None, "Start from these weights: a run directory or checkpoint .pt (whole model), or "
                            "a transformers / ml-aim encoder. A learned position table is resampled (bicubic) or "
                            "dropped (sin-cos).", path="existing")
    resume: bool = flag(False, "Continue the run in --output from its newest complete checkpoint (starts fresh if "
                        "it has none).")
    stop_at: int | None = flag(None, "Checkpoint and end at this step, as if interrupted (then --resume).")
    seed: int = flag(0, "Random seed. It seeds initial weights, data order and prefix lengths.")
    device: str | None = flag(None, "torch device: cpu, cuda or cuda:N. Default: cuda when available, else cpu. "
                              "Under torchrun each rank takes its LOCAL_RANK's GPU (cuda:N is refused there); the DALI decoder "
                              "runs on the model's GPU.")
    workers: int = flag(4, "Worker processes (0: the work runs in this process). Here: the loader's, per rank. "
                        "Default 4, the one command not at 0: the GPU waits on the loader every step. "
                        + workers_help(), short="-j")
    # the loader's image decoder (not the model's multimodal decoder); --decoder is its older name
    image_decoder: str = flag("pil", "Image decoder of the loader: " + decoders_help(), choices=DECODERS,
                              old=("--decoder",))
    mix: str | None = flag(None, "Source mixture, e.g. dfn=0.60,coyo=0.06,hqitp=0.31: each source its own stream with "
                           "its own epochs. Default: the paper's Table 2 ("
                           + "/".join(str(sum(r.values())) for r in TABLE2.values()) + ") over the sources the manifest has; "
                           "'rows': as the manifest has them.", metavar="SRC=W,...")
    caption_mix: str | None = flag(None, "Which caption a sample trains with, per source: weights over alt (alt-text), "
                                   "synthetic (every attached set, pooled) or a set by name, e.g. coyo:alt=0.5,"
                                   "coyo:recap=0.5 (default: a source with no row). Sources it does not name keep the "
                                   "paper's Table 2 (" + ", ".join(f"{s.upper()} alt {r['alt']} : synthetic {r['synthetic']}"
                                                                     for s, r in TABLE2.items()) + ").",
                                   metavar="SRC:SET=W,...")
    cache_dir: str | None = flag(None, "Cache folder. Shards at URLs (s3://...): fetched samples are kept there (later "
                                 "epochs read the local disk).", path="dir")
    cache_gb: float = flag(0.0, "Size limit of --cache-dir in GB.")
    compile: bool = flag(False, "torch.compile the step: at fixed resolution the model and loss as one graph; with "
                         "--native-res each transformer block on its own, its sequence dimension dynamic (a bounded "
                         "handful of graphs whatever the grids; see --compile-dynamic, --compile-warmup).")
    compile_dynamic: str = flag("auto", "With --compile --native-res: true / auto (dynamic block shapes: a few graphs "
                                "for every grid), false (one static block graph per (grid, B) the sampler can draw: the "
                                "fallback where Inductor fails on dynamic shapes; run it with --compile-warmup).",
                                choices=COMPILE_DYNAMIC)
    compile_warmup: bool = flag(False, "With --compile: before step 0, forward and backward on a synthetic batch of "
                                "each (grid, B) the sampler can draw, in the same order on every rank, so no rank "
                                "compiles mid-run (stalling the others at the next collective). Static graphs: every "
                                "(grid, B); dynamic blocks: one grid per area and batch size, which compiles all their "
                                "graphs. Gradients dropped, no update. Graphs, seconds, recompiles: run.json, summary.")
    precision: str | None = flag(None, "bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on CPU).",
                                 choices=("bf16", "fp32"))
    parallel: str = flag("ddp", "Under torchrun: DDP (replicated) or FSDP2 (fully_shard, sharded state, DCP "
                         "checkpoints).", choices=PARALLEL_MODES)
    dist_timeout: float = flag(60.0, "Under torchrun: minutes a collective waits for the slowest rank before the run "
                               "fails (the process-group timeout; NCCL's own is 10, less than rank 0 may need to write "
                               "a 1B/3B checkpoint to network storage while the others wait).")
    lr: float | None = flag(None, "Peak learning rate (default: Table A1 for the size).")
    min_lr: float | None = flag(None, "Final learning rate of the cosine. Default 1e-5.")
    warmup: int | None = flag(None, "Warmup steps (default: min(12500, 5% of --steps)).")
    weight_decay: float | None = flag(None, "Fully decoupled weight decay (default 1e-4; 0 for --stage highres).")
    clip: float | None = flag(None, "Gradient-norm clipping. Default 1.0; 0 disables.")
    save_every: int = flag(1000, "Checkpoint every K steps (always also at the end and at --stop-at; 0: only "
                           "those).")
    keep: int = flag(2, "Checkpoints kept (0: all).")
    keep_global_batch: bool = flag(False, "With --resume at another number of ranks: keep the checkpoint's global "
                                   "batch, the per-rank --batch-size (or --batch-patches) scaled by old ranks / new "
                                   "ranks (must divide; add --grad-accum if the larger batch does not fit). Without "
                                   "it the per-rank batch stays and the global batch scales with the ranks. With it, every "
                                   "--resume takes the per-rank batch from the checkpoint.")
    grad_accum: int = flag(1, "Split each rank's batch into N micro-batches, forward and backward one at a time, one "
                           "optimiser step: the same images and update as the whole batch, with about 1/N of its "
                           "activation memory (N larger than a batch's images: one image each).")
    dry_run: bool = flag(False, "Print the plan (per-device memory at the worst step, global batch, steps, tokens) "
                         "and exit 0; builds nothing big, needs no --manifest / --output (--tokenizer: its "
                         "vocabulary, else the preset's). WORLD_SIZE=N plans for N ranks.")
    grad_checkpointing: bool = flag(False, "Recompute block activations in backward (less memory).")
    progress: bool = flag(True, "No progress bar (the summary is still printed).", name="--no-progress")
    peak_flops: float | None = flag(None, "FLOP/s of one device for MFU (default: the GPU's datasheet bf16 peak, else "
                                    "the best matmul measured on this machine, metrics.reference_peak).")
    warn_replaced: float = flag(0.02, "Warn when more than this share of the samples drawn were replacements for "
                                "unreadable ones (0-1).")
    allow_no_captions: bool = flag(False, "Train on a manifest without a single caption (the text loss then trains "
                                   "on empty captions).")
    log_interval: float = flag(60.0, "With --no-progress: one log line (step, loss, images/s, replacements, ETA) "
                               "every this many seconds (0: none).")
    report_to: str = flag("", "Also log every metric to these trackers, comma-separated: tensorboard (event files "
                          "in RUN/tensorboard), wandb (honours WANDB_MODE etc.; offline works without network). "
                          "Rank 0 only.")
    wandb_project: str = flag("aimv2", "wandb project name (--report-to wandb).")
    val_manifest: str | None = flag(None, "Held-out manifest (e.g. from `aimv2 split`): val_loss, val_loss_img, "
                                    "val_loss_text in metrics.jsonl (centred crops, no augmentation, deterministic).",
                                    path="existing_dir")
    val_every: int = flag(1000, "Validate every N steps with --val-manifest (always also at the last step; 0: only "
                          "then).")
    val_batches: int | None = flag(None, "Batches per validation (default: the whole held-out manifest, full "
                                   "batches).")
    attention: str = flag("auto", "Encoder prefix-mask kernel: flex (FlexAttention BlockMask, GPU), sdpa (dense "
                          "mask, the reference), auto (flex on CUDA, sdpa on CPU).", choices=ATTENTION_KINDS)
    threads: int | None = flag(None, "torch CPU threads per rank (default: OMP_NUM_THREADS if set, else the CPUs "
                               "in this process's affinity / local ranks).", name="--torch-threads", old=("--threads",))

    def resolved_stage(self) -> str:
        return self.stage or ("native" if self.native_res else "pretrain")
