import click

from cli.flags import option


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@option("-o", "--output", "out", type=click.Path(file_okay=False), old=("--out",),
        help="Output folder. The PNGs go there (default: the first RUN).")
@click.option("--smooth", default=0.0, show_default=True,
              help="Exponential moving average of the curves (0 = raw, 0.9 = smooth); lr is never smoothed.")
def plot(runs, out, smooth):
    """Draw training curves of one or more RUN directories (their metrics.jsonl) as PNGs:
    loss.png, lr.png, grad_norm.png, throughput.png. Several runs are overlaid."""
    from aimv2train.train.plot import plot_runs

    try:
        paths = plot_runs(list(runs), out, smooth)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    for p in paths:
        click.echo(p)
