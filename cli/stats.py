import json
from pathlib import Path

import click

from cli.options import require_manifest


@click.command()
@click.argument("manifest")
@click.option("--plot", "plot_dir", type=click.Path(file_okay=False),
              help="Also write PNG plots (buckets, sizes, aspects, caption lengths) into this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object. Instead of tables.")
def stats(manifest, plot_dir, as_json):
    """Counts per source and bucket, size and aspect histograms, caption coverage and length, rejects.
    With --plot DIR, also the pictures, and a link to DIR/preview/index.html (`aimv2 preview`: the batches)."""
    require_manifest(manifest)
    from rich.console import Console
    from rich.table import Table

    from aimv2data.manifest.integrity import ManifestMismatch
    from aimv2data.manifest.stats import compute_stats, plot_stats

    try:
        s = compute_stats(manifest)
    except (FileNotFoundError, ManifestMismatch) as e:
        raise click.ClickException(str(e)) from None
    files = plot_stats(s, plot_dir) if plot_dir else []
    if as_json:
        click.echo(json.dumps({k: v for k, v in s.items() if not k.startswith("_")}))
        return
    c = Console()
    n = s["samples"]
    total = n + s["rejects"]
    c.print(f"[bold]{manifest}[/]: {n} samples, {s['rejects']} rejects"
            + (f" ({100 * s['rejects'] / total:.1f}% of {total})" if total else ""))

    def table(title, rows, cols):
        t = Table(title=title, title_justify="left")
        for col in cols:
            t.add_column(col, justify="right" if col != cols[0] else "left")
        for r in rows:
            t.add_row(*map(str, r))
        c.print(t)

    table("per source", [(k, v, f"{100 * v / n:.1f}%") for k, v in s["per_source"].items()],
          ["source", "samples", "share"])
    if s["per_reason"]:
        table("rejects", [(k, v) for k, v in s["per_reason"].items()], ["reason", "count"])
    peak = max((b["samples"] for b in s["per_bucket"]), default=0) or 1
    used = [b for b in s["per_bucket"] if b["samples"]]
    table(f"per bucket ({len(s['per_bucket']) - len(used)} empty buckets not shown)",
          [(b["bucket"], f"{b['aspect']:.3f}", b["samples"], f"{100 * b['share']:.1f}%",
            "#" * round(30 * b["samples"] / peak)) for b in used], ["bucket", "w/h", "samples", "share", ""])
    if n:
        sz = s["size"]
        table("display size", [(k, *v.values()) for k, v in sz.items()], ["", "p5", "p25", "p50", "p75", "p95"])
        e, h = s["aspect_hist"]["log2_edges"], s["aspect_hist"]["counts"]
        peak = max(h) or 1
        table("aspect w/h", [(f"{2 ** e[i]:.2f}-{2 ** e[i + 1]:.2f}", v, "#" * round(30 * v / peak))
                             for i, v in enumerate(h) if v], ["w/h", "samples", ""])
        c.print(f"formats: {s['per_format']}   modes: {s['per_mode']}   rotated by EXIF: {s['rotated_by_exif']}")
    table("captions", [(col, f"{100 * v['coverage']:.1f}%", v["captions_per_sample"], v["words"]["p50"],
                        v["words"]["p95"], v["chars"]["p50"]) for col, v in s["captions"].items()],
          ["column", "coverage", "per sample", "words p50", "words p95", "chars p50"])
    for f in files:
        c.print(f"plot: {f}")
    if plot_dir:  # the batches the loader makes from these samples, the most telling picture
        index = Path(plot_dir) / "preview" / "index.html"
        c.print(f"batches: {index}" if index.is_file() else
                f"batches: aimv2 preview {manifest} -o {index.parent} [--native-res] (then open {index})",
                soft_wrap=True)
