import click


@click.command()
@click.argument("run", type=click.Path(exists=True))
@click.option("--format", "fmt", type=click.Choice(["hf", "aim"]), required=True,
              help="hf: a transformers Aimv2VisionModel folder (config.json, model.safetensors, "
                   "preprocessor_config.json). aim: model.safetensors with ml-aim AIMv2VisionEncoder keys.")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Output folder. Written whole (with a README.md model card) or not at all.")
@click.option("--step", type=int, default=None, help="Export RUN/checkpoints/step_N.pt (default: the newest).")
@click.option("--probe-results", type=click.Path(exists=True, dir_okay=False), default=None,
              help="`aimv2 probe --output` JSON to quote in the card (default: RUN/probe.json when present).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --output.")
@click.option("--heads", type=int, default=None,
              help="Attention heads, only for bare state dicts whose width is not a multiple of 128.")
def export(run, fmt, output, step, probe_results, overwrite, heads):
    """Export the encoder of training run RUN (or a checkpoint file, or any weights `aimv2 embed` reads)
    for transformers or ml-aim, with a model card naming the data, steps and probe results.

    \b
    aimv2 export RUN --format hf -o exported/my-aimv2          # Aimv2VisionModel.from_pretrained(...)
    aimv2 export RUN --format aim --step 5000 -o exported/aim  # ml-aim keys
    """
    from rich.console import Console

    from aimv2train.eval.export import ExportError
    from aimv2train.eval.export import export as run_export
    from aimv2train.eval.weights import WeightsError

    try:
        s = run_export(run, fmt, output, step=step, probe_results=probe_results, overwrite=overwrite, heads=heads)
    except (ExportError, WeightsError) as e:
        raise click.ClickException(str(e)) from None
    c = s["encoder"]
    console = Console(stderr=True)
    console.print(f"[green]exported[/] {s['checkpoint']} (step {s['step']}) as {fmt} -> {s['output']}: "
                  f"{', '.join(s['files'])}")
    console.print(f"encoder {c['dim']}x{c['depth']}, {c['heads']} heads, {c['pos_embed']} positions, "
                  f"sha256 {s['sha256'][:12]}")
    if s["probe_results"]:
        note = "" if s["probe_matches"] else " [yellow](for different weights: said so in the card)[/]"
        console.print(f"probe results from {s['probe_results']}{note}")
    else:
        console.print("no probe results: the card says how to add them (`aimv2 probe ... -o RUN/probe.json`)")
