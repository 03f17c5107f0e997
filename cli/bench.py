import json

import click

from aimv2data.loader.decoders import workers_help
from cli.flags import option
from cli.options import decoder_option, require_manifest


@click.group()
def bench():
    """Measure pipeline stages on this machine."""


@bench.command("loader")
@click.argument("manifest")
@click.option("--inflight", type=int, default=32, show_default=True,
              help="Shards at URLs (s3://...): ranged reads in flight per batch.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache folder. Shards at URLs (s3://...): fetched samples are kept there (a second epoch reads "
              "the local disk).")
@click.option("--cache-gb", type=float, default=0.0, show_default=True, help="Size limit of --cache-dir in GB.")
@click.option("--native-res", is_flag=True,
              help="Native resolution. Per step an area A = 2^n patches (n from a truncated normal on 7..12) and "
              "B = C / A images.")
@click.option("--batch-patches", "-C", type=int, default=2**16, show_default=True,
              help="C: patches per step per rank with --native-res (a power of two >= 4096).")
@click.option("--batch-rule", type=click.Choice(["area", "grid"]), default="area", show_default=True,
              help="--native-res batch size: area = C / A; grid = C // (h*w). area is exact (the paper's rule); grid "
              "fills the budget when a bucket's grid h*w is below A.")
@click.option("--resolution", "-R", type=int, default=224, show_default=True,
              help="Fixed resolution R in pixels. RandomResizedCrop to R x R (224; 336/448 for high-res).")
@click.option("--batch-size", "-B", type=int, default=256, show_default=True,
              help="Images per step per rank at fixed resolution (as `aimv2 train -B`).")
@decoder_option("--image-decoder", "decoder", help_prefix="Image decoder of the loader: ", old=("--decoder",))
@click.option("--workers", "-j", type=int, default=0, show_default=True,
              help="Worker processes (0: the work runs in this process). Here: the loader's. Default 0, as in every "
              "command but train (4): a benchmark on one core measures one process. " + workers_help())
@click.option("--steps", "-s", type=click.IntRange(min=1), default=50, show_default=True,
              help="Steps to run. Loader steps, timed (after --warmup untimed ones).")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="Untimed steps first (worker start-up).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed. It seeds the sampler, as `aimv2 train --seed` does.")
@click.option("--no-draft", is_flag=True, help="pil: decode JPEGs at full size (no reduced-scale draft).")
@click.option("--steps-log", type=click.Path(dir_okay=False),
              help="Write one JSON line per step (step, area, grid_h, grid_w, batch_size, padding, "
                   "sources: {name: images}, ...).")
@click.option("--mix", default=None, metavar="SRC=W,...",
              help="Source mixture, e.g. dfn=0.60,coyo=0.06,hqitp=0.31: each source its own stream with its own "
              "epochs. Default: the paper's Table 2 over the sources present; 'rows': as the manifest has them.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object. The last stdout line "
              "(the table goes to stderr).")
def loader(manifest, inflight, cache_dir, cache_gb, native_res, batch_patches, batch_rule, resolution, batch_size,
           decoder, workers, steps, warmup, seed, no_draft, steps_log, mix, as_json):
    """Stream STEPS batches from MANIFEST and report images/s, patches/s, budget use and padding."""
    require_manifest(manifest)
    from rich.console import Console
    from rich.table import Table

    from aimv2data.loader.bench import run_bench
    from aimv2data.loader.samples import ManifestError

    try:
        r = run_bench(manifest, native_res=native_res, batch_patches=batch_patches, resolution=resolution,
                      batch_size=batch_size, decoder=decoder, workers=workers, steps=steps, warmup=warmup,
                      seed=seed, draft=not no_draft, batch_rule=batch_rule, steps_log=steps_log, mix=mix,
                      read_inflight=inflight, cache_dir=cache_dir, cache_gb=cache_gb if cache_dir else 0.0)
    except (ManifestError, ValueError, OSError) as e:
        raise click.ClickException(str(e)) from None
    t = Table(title=f"aimv2 bench loader: {r['mode']}, {r['decoder']} ({r['device']}), workers={r['workers']}",
              show_header=False)
    t.add_row("steps (timed)", f"{r['steps']} after {r['warmup']} warm-up, {r['elapsed_s']:.2f} s")
    t.add_row("images/s", f"{r['images_per_s']:.1f} (per CPU-second: {r['images_per_cpu_s']:.1f})")
    t.add_row("patches/s", f"{r['patches_per_s']:.0f}")
    t.add_row("budget use", f"{100 * r['budget_use']:.2f} % of C = {r['batch_patches']} patches/step")
    t.add_row("padding", f"{100 * r['padding']:.2f} %")
    t.add_row("areas", ", ".join(f"{a}: {n}" for a, n in r["areas"].items()))
    t.add_row("sources", ", ".join(f"{k}: {n}" for k, n in r["sources"].items()) + "  (mix "
              + ", ".join(f"{k}={w:.3f}" for k, w in r["mix"].items()) + ")")
    t.add_row("replaced samples", str(r["replaced"]))
    t.add_row("cpu", f"{r['cpu']} ({r['cpus']} cpus)")
    Console(stderr=as_json).print(t)
    if as_json:
        click.echo(json.dumps(r))


def _gpu_options(command):
    """aimv2train.gpucheck.OPTIONS as click options (the plain `python -m aimv2train.gpucheck` reads the same)."""
    from aimv2train.gpucheck import METAVARS, OLD, OPTIONS, SHORT

    for flag, default, kind, text in reversed(OPTIONS):
        if flag in SHORT:
            command = option(SHORT[flag], flag, old=OLD.get(flag, ()), type=kind, default=default, show_default=True,
                             metavar=METAVARS.get(flag), help=text)(command)
        elif kind == "flag":
            command = click.option(flag, is_flag=True, help=text)(command)
        elif isinstance(kind, tuple):
            command = click.option(flag, type=click.Choice(kind), default=default, show_default=True, help=text)(command)
        else:
            extra = {"callback": _parts} if flag == "--parts" else {}
            command = click.option(flag, type=kind, default=default, show_default=default not in (None, ""),
                                   metavar=METAVARS.get(flag), help=text, **extra)(command)
    return command


def _parts(ctx, param, value):
    from aimv2train.gpucheck import parse_parts

    try:
        return parse_parts(value)
    except ValueError as e:
        raise click.BadParameter(str(e).removeprefix("--parts: ")) from None


@bench.command("gpu")
@_gpu_options
def gpu(**opts):
    """The prepared GPU check on one GPU: the real `aimv2 train` on carried photos (L, bf16, compiled, DALI
    when present), AIMv2-L steps (flex vs SDPA, eager vs compiled, MFU), CUDA/CPU parity, DALI vs pil decoding;
    one JSON file and a table. --dry-run: tiny sizes on CPU. --prepare DIR: only write the trainer part's
    payload here, for --data DIR there. The GPU machine runs `python -m aimv2train.gpucheck` (no click);
    the device calls and their time budget: docs/gpucheck.md."""
    from aimv2train.gpucheck.runner import execute

    raise SystemExit(execute(**opts))
