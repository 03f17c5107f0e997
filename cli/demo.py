"""`aimv2 demo`: flags and the summary table; the pipeline itself is aimv2train/demo_pipeline.py."""
from __future__ import annotations

from pathlib import Path

import click

from cli.flags import option


@click.command()
@option("-o", "--output", "out", default="demo_out", show_default=True, metavar="DIR", old=("--out",),
        help="Output folder. The demo writes everything there; rerunning with the same DIR skips finished steps.")
def demo(out):
    """Run the pipeline end to end on the embedded demo corpus (real scikit-image photos plus generated
    images), served by a loopback HTTP server: corpus -> fetch (COYO-style list) -> fetch (DFN-style pool +
    uid index) -> shard -> attach synthetic captions -> sentencepiece tokenizer -> train a tiny AIMv2 at
    56 px -> continue at native resolution -> probe both trunks and a random one on held-out patterns ->
    export a transformers folder. Offline; about 70 s on 2 CPU cores (benchmarks/RESULTS.md); a rerun
    skips steps that are done."""
    from rich.console import Console
    from rich.table import Table

    from aimv2train.demo_pipeline import DemoStepFailed, run_demo

    console = Console()
    if not console.is_terminal:  # logs and CI: room for the summary table instead of 80 columns
        console = Console(width=140)
    root = Path(out)
    rows = []
    try:
        for r in run_demo(root, console):
            status = "[dim]already done[/]" if r.skipped else f"[green]done[/] in {r.seconds:.1f} s"
            rows.append((r.name, status, r.output, r.detail))
    except DemoStepFailed as e:
        raise click.ClickException(f"{e}; rerun `aimv2 demo -o {out}` to resume") from e
    t = Table(title=f"aimv2 demo: everything is under {root.resolve()}", title_justify="left")
    for col in ("step", "status", "output", "result"):
        t.add_column(col)
    for name, status, path, detail in rows:
        t.add_row(name, status, str(path), detail)
    console.print(t)
