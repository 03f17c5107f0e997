import click

from aimv2data.paper import EVAL_MAX_PATCHES

_A2 = "Table A2"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(",", " ").split())
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}") from None


@click.command()
@click.option("--checkpoint", "-c", required=True, type=click.Path(exists=True),
              help="Encoder weights: a training run directory (newest checkpoint), a checkpoint file, a transformers "
                   "Aimv2VisionModel folder or ml-aim weights (.pth/.safetensors).")
@click.option("--train", "train_data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Training images: an image-folder tree DATA/<class>/<image> or a manifest directory with a "
                   "label column.")
@click.option("--val", "val_data", required=True, type=click.Path(exists=True, file_okay=False),
              help="Validation images, same layout; its classes must all be in --train.")
@click.option("--label-col", default="label", show_default=True, help="Label column of manifest data sets.")
@click.option("--resolution", type=int, default=None,
              help="Fixed resolution R in pixels. Shorter side to R, centre crop R x R; default: the trunk's own "
              "(learned positions).")
@click.option("--native-res", is_flag=True,
              help="Native resolution. Each image keeps its aspect ratio on at most --max-patches patches (the "
                   "default for sin-cos trunks).")
@click.option("--max-patches", type=click.IntRange(min=1), default=EVAL_MAX_PATCHES, show_default=True,
              help="Patch budget A per image with --native-res (h*w <= A); smaller images keep their own size. "
              "The default, a 224 px image's grid, is the same in `aimv2 embed` and `aimv2 probe`.")
@click.option("--lrs", default="5e-5,1e-4,2e-4,3e-4,5e-4,1e-3,2e-3", show_default=True,
              help=f"Peak learning rates of the sweep ({_A2}'s grid; give fewer to shorten it).")
@click.option("--wds", default="0.05,0.1", show_default=True, help=f"Weight decays of the sweep ({_A2}).")
@click.option("--epochs", default=100, show_default=True, help=f"Probe training epochs ({_A2}: 100).")
@click.option("--batch-size", default=1024, show_default=True,
              help=f"Probe batch size ({_A2}: 1024; capped at the training set size).")
@click.option("--warmup-epochs", default=5, show_default=True, help="Linear warmup before the cosine decay.")
@click.option("--min-lr", default=1e-5, show_default=True, help=f"Final learning rate of the cosine. {_A2}'s.")
@click.option("--clip", default=3.0, show_default=True, help=f"Gradient-norm clipping. Per probe ({_A2}).")
@click.option("--probe-heads", type=int, default=None,
              help="Attention heads of the attentive probe (default: the trunk's).")
@click.option("--queries", default=1, show_default=True, help="Learned query tokens (their outputs are averaged).")
@click.option("--no-linear", is_flag=True, help="Skip the linear probe on mean-pooled features.")
@click.option("--seed", default=0, show_default=True, help="Random seed. It seeds the probes' initial weights "
              "and data order.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Output file. The full results JSON goes there (e.g. RUN/probe.json, which `aimv2 export` picks up).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache folder. Features are kept there (default ~/.cache/aimv2/probe), keyed by weights, data and "
              "preprocessing.")
@click.option("--cache-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage type of cached tokens (pooled features are always float32).")
@click.option("--encode-batch-size", default=64, show_default=True, help="Images per trunk forward pass.")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker processes (0: the work runs in this process). Here: image decoding for the feature cache. "
              "Default 0 as in every command but train (4).")
@click.option("--device", default=None, help="torch device: cpu, cuda or cuda:N. Default: cuda when available, else cpu.")
@click.option("--heads", type=int, default=None,
              help="Attention heads, only for bare state dicts whose width is not a multiple of 128.")
@click.option("--no-progress", is_flag=True, help="No progress bar (the summary is still printed).")
def probe(checkpoint, train_data, val_data, label_col, resolution, native_res, max_patches, lrs, wds, epochs,
          batch_size, warmup_epochs, min_lr, clip, probe_heads, queries, no_linear, seed, output, cache_dir,
          cache_dtype, encode_batch_size, workers, device, heads, no_progress):
    """Frozen-trunk probes: an attentive probe over all tokens and a linear probe over their mean, each
    swept over learning rate x weight decay (paper Table A2). Features are computed once and cached;
    augmentations are therefore off. Prints a summary to stderr and, as the last stdout line, the
    results as JSON (top-1 per setting and the best).

    \b
    aimv2 probe -c RUN --train data/train --val data/val --lrs 1e-3,2e-3 --wds 0.05 -o RUN/probe.json
    """
    if resolution is not None and native_res:   # the cheap checks before the imports (torch)
        raise click.UsageError("--resolution and --native-res are exclusive: pick one")
    lrs, wds = _floats(lrs), _floats(wds)
    import json

    from rich.console import Console

    from aimv2train.eval.probe import ProbeConfig, ProbeJob, run_probe, write_results
    from aimv2train.eval.probe_data import ProbeDataError
    from aimv2train.eval.weights import WeightsError

    console = Console(stderr=True)
    try:
        cfg = ProbeConfig(lrs=lrs, wds=wds, epochs=epochs, batch_size=batch_size,
                          warmup_epochs=warmup_epochs, min_lr=min_lr, clip=clip, heads=probe_heads,
                          queries=queries, linear=not no_linear, seed=seed)
        job = ProbeJob(checkpoint=checkpoint, train=train_data, val=val_data, resolution=resolution,
                       native_res=native_res, max_patches=max_patches, label_col=label_col, cache_dir=cache_dir,
                       cache_dtype=cache_dtype, encode_batch_size=encode_batch_size, workers=workers,
                       device=device, heads_for_bare=heads, progress=not no_progress)
        results = run_probe(job, cfg, log=console.print)
    except (ProbeDataError, WeightsError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if output:
        write_results(results, output)
    _print_summary(console, results, output)
    click.echo(json.dumps(results))


def _print_summary(console, results: dict, output) -> None:
    """The human summary on stderr (stdout keeps only the JSON): the sweep, images left out, where things are."""
    console.print(_results_table(results))
    for split in ("train", "val"):
        sk = results[split]["skipped"] + results[split]["dropped"]
        if sk:
            console.print(f"[yellow]{split}: {len(sk)} images left out[/] (all named in the results JSON), e.g.:")
            for s in sk[:5]:
                console.print(f"  {s['name']}: {s['reason']}")
    console.print(f"features cached in {results['cache']['train']} and {results['cache']['val']}; "
                  f"{results['seconds']:.1f}s" + (f"; results in {output}" if output else ""))


def _results_table(results: dict):
    """One row per (probe, lr, wd) setting; each probe's best is starred and bold."""
    from rich.table import Table

    t = Table(title=f"aimv2 probe: {len(results['classes'])} classes, train {results['train']['images']} / "
                    f"val {results['val']['images']} images (chance {results['chance_top1']:.1f}%, "
                    f"majority {results['majority_top1']:.1f}%)")
    for col in ("probe", "lr", "wd", "val top-1", "train loss"):
        t.add_column(col, justify="right" if col != "probe" else "left")
    for kind in ("attentive", "linear"):
        if kind not in results:
            continue
        best = results[kind]["best"]
        for r in results[kind]["results"]:
            star = r is best
            top1 = "diverged" if r["diverged"] else f"{r['top1']:.2f}%"
            t.add_row(kind + (" *" if star else ""), f"{r['lr']:g}", f"{r['wd']:g}",
                      f"[bold]{top1}[/]" if star else top1,
                      "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}")
    return t
