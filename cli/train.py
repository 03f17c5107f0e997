import click


@click.command()
@click.option("--manifest", "-m", required=True, type=click.Path(exists=True, file_okay=False),
              help="Manifest directory written by `aimv2 shard` (with captions attached).")
@click.option("--tokenizer", "-t", required=True, type=click.Path(exists=True, dir_okay=False),
              help="sentencepiece .model (`aimv2 tokenizer train`, or any existing one, e.g. SigLIP's).")
@click.option("--model", default="tiny", show_default=True,
              help="Size preset: tiny | base | L | H | 1B | 3B (paper Table 1).")
@click.option("--steps", default=1000, show_default=True, help="Length of the run in optimiser steps (sets the schedule).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Run directory: metrics.jsonl, checkpoints/, run.json, summary.json.")
@click.option("--stage", type=click.Choice(["pretrain", "highres", "native"]), default=None,
              help="pretrain (224 px); highres (336/448 px, weight decay 0, needs --init); native "
                   "(--native-res, sin-cos positions, needs --init). Default: native with --native-res, else pretrain.")
@click.option("--native-res", is_flag=True,
              help="Native resolution: per step an area A = 2^n patches (n in 7..12) and B = C / A images.")
@click.option("--batch-patches", default=65536, show_default=True,
              help="C, patches per rank per step with --native-res (a power of two >= 4096).")
@click.option("--resolution", type=int, default=None,
              help="Fixed resolution in pixels (RandomResizedCrop); default 224, or 336 for --stage highres.")
@click.option("--batch-size", default=256, show_default=True,
              help="Images per rank per step at fixed resolution (Table A1: 8192 in total).")
@click.option("--init", type=click.Path(exists=True),
              help="Start from these weights: a run directory or checkpoint .pt (whole model), or a "
                   "transformers / ml-aim encoder. A learned position table is resampled (bicubic) or dropped (sin-cos).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest complete checkpoint "
              "(starts fresh if it has none).")
@click.option("--stop-at", type=int, default=None,
              help="Checkpoint and end at this step, as if interrupted (then --resume).")
@click.option("--seed", default=0, show_default=True, help="Seeds initial weights, data order and prefix lengths.")
@click.option("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available).")
@click.option("--workers", default=4, show_default=True, help="Loader worker processes per rank (0: in-process).")
@click.option("--decoder", type=click.Choice(["pil", "dali"]), default="pil", show_default=True,
              help="Image decoder of the loader.")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the model and loss (dynamic shapes with --native-res).")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default=None,
              help="bf16 autocast or fp32 (default: bf16 on CUDA, fp32 on CPU).")
@click.option("--parallel", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="Under torchrun: DDP (replicated) or FSDP2 (fully_shard, sharded state, DCP checkpoints).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default: Table A1 for the size).")
@click.option("--min-lr", type=float, default=None, help="Final learning rate of the cosine (default 1e-5).")
@click.option("--warmup", type=int, default=None, help="Warmup steps (default: min(12500, 5% of --steps)).")
@click.option("--weight-decay", type=float, default=None,
              help="Fully decoupled weight decay (default 1e-4; 0 for --stage highres).")
@click.option("--clip", type=float, default=None, help="Gradient-norm clipping (default 1.0; 0 disables).")
@click.option("--save-every", default=1000, show_default=True,
              help="Checkpoint every K steps (always also at the end and at --stop-at; 0: only those).")
@click.option("--keep", default=2, show_default=True, help="Checkpoints kept (0: all).")
@click.option("--grad-checkpointing", is_flag=True, help="Recompute block activations in backward (less memory).")
@click.option("--peak-flops", type=float, default=None,
              help="MFU reference in FLOP/s per device (default: the GPU's datasheet bf16 peak, else the best "
                   "matmul measured on this machine, cached in ~/.cache/aimv2/peak_flops.json).")
@click.option("--no-progress", is_flag=True, help="No progress bar; instead one log line (step, loss, images/s, "
              "replacements, ETA) every --log-interval seconds, for batch jobs. The summary is still printed.")
@click.option("--log-interval", default=60.0, show_default=True,
              help="Seconds between the log lines of --no-progress (0: none).")
@click.option("--warn-replaced", default=0.02, show_default=True,
              help="Warn at the end when more than this share of drawn samples were replacements for samples "
                   "that could not be read or decoded (the count is in the progress line and metrics.jsonl).")
@click.option("--allow-no-captions", is_flag=True,
              help="Train on a manifest without a single caption (refused otherwise: the text loss would "
                   "learn empty captions).")
def train(manifest, tokenizer, model, steps, out, stage, native_res, batch_patches, resolution, batch_size, init,
          resume, stop_at, seed, device, workers, decoder, compile_, precision, parallel, lr, min_lr, warmup,
          weight_decay, clip, save_every, keep, grad_checkpointing, peak_flops, no_progress, log_interval,
          warn_replaced, allow_no_captions):
    """Pre-train (or adapt) an AIMv2 encoder with its multimodal decoder.

    \b
    One process:  aimv2 train -m MANIFEST -t tok.model --model tiny --steps 300 --resolution 112 --batch-size 16 -o RUN
    Several:      torchrun --nproc_per_node 8 -m cli.main train ... [--parallel fsdp]
    Curves:       aimv2 plot RUN
    """
    from rich.console import Console
    from rich.table import Table

    from aimv2train.train.trainer import NonFiniteLoss, TrainConfig, TrainError
    from aimv2train.train.trainer import train as run

    cfg = TrainConfig(manifest=manifest, tokenizer=tokenizer, out=out, model=model, steps=steps, stage=stage,
                      native_res=native_res, batch_patches=batch_patches, resolution=resolution,
                      batch_size=batch_size, init=init, resume=resume, stop_at=stop_at, seed=seed, device=device,
                      workers=workers, decoder=decoder, compile=compile_, precision=precision, parallel=parallel,
                      lr=lr, min_lr=min_lr, warmup=warmup, weight_decay=weight_decay, clip=clip,
                      save_every=save_every, keep=keep, grad_checkpointing=grad_checkpointing,
                      progress=not no_progress, log_interval=log_interval, peak_flops=peak_flops,
                      warn_replaced=warn_replaced,
                      allow_no_captions=allow_no_captions)
    try:
        s = run(cfg)
    except NonFiniteLoss as e:
        click.secho(f"aimv2 train: {e}", fg="red", err=True)  # unwrapped: the path must stay copyable
        raise SystemExit(3) from None
    except (TrainError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if s["rank"] != 0:  # under torchrun, one summary
        return
    t = Table(title=f"aimv2 train: {s['status']} at step {s['step']}/{s['steps']}", show_header=False)
    for key in ("model", "stage", "data", "world", "precision", "lr", "weight_decay", "init", "resumed_from"):
        if s.get(key) is not None:
            t.add_row(key, str(s[key]))
    if "loss_end" in s:
        t.add_row("loss", f"{s['loss_start']:.4f} -> {s['loss_end']:.4f} (mean of the first / last "
                  f"{s['loss_window']} steps logged)")
        t.add_row("  image / text", f"{s['loss_img_end']:.4f} / {s['loss_text_end']:.4f}")
        t.add_row("throughput", f"{s['steps_per_s']:.2f} steps/s, {s['images_per_s']:.1f} images/s, "
                  f"{s['patches_per_s']:.0f} patches/s")
        t.add_row("MFU", f"{100 * s['mfu']:.1f}% of {s['peak_flops'] / 1e9:.0f} GFLOP/s "
                  f"({s.get('peak_source', 'measured matmul peak')})")
    if "replaced" in s:
        t.add_row("replaced", f"{s['replaced']} of {s['draws']} samples drawn ({100 * s['replaced_share']:.1f}%) "
                  "could not be read or decoded and were replaced")
    t.add_row("checkpoint", str(s.get("checkpoint")))
    t.add_row("run", f"{s['run']} (metrics.jsonl; curves: aimv2 plot {s['run']})")
    Console().print(t)
    if s["status"] == "interrupted":  # 130 (SIGINT) / 143 (SIGTERM): resumable, not finished (docs/contracts.md)
        raise SystemExit(s["exit_code"])
