import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def doctor(as_json):
    """Report versions and capabilities: live PIL (Pillow-SIMD? AVX2?), DALI device, CUDA, threads."""
    from rich.console import Console
    from rich.table import Table

    from aimv2data.environment import report

    r = report()
    if as_json:
        click.echo(json.dumps(r))
        return
    pil, dali, torch = r["pil"], r["dali"], r["torch"]
    t = Table(title="aimv2 doctor", show_header=False)
    t.add_row("python", f"{r['python']} ({r['machine']}, {r['cpu_count']} cpus, avx2={r['cpu_avx2']})")
    simd = "[green]Pillow-SIMD[/]" if pil["simd"] else "[yellow]plain Pillow (install pillow-simd for ~2x decode)[/]"
    t.add_row("PIL", f"{simd} {pil['version']} from {pil['distribution']}; AVX2 build: {pil['avx2']}")
    t.add_row("PIL codecs", ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in pil["codecs"].items())
              + f", libjpeg-turbo={pil['libjpeg_turbo']}")
    jpeg = r["jpeg"]
    note = "" if jpeg["crop_window"] else " [yellow](rerun `make install` with libjpeg62-turbo-dev for the crop window)[/]"
    t.add_row("pil JPEG path", f"{jpeg['path']}{note}")
    if dali["available"]:
        t.add_row("DALI", f"{dali['version']} on {dali['device']} ({dali['cuda_devices']} CUDA devices)")
    else:
        t.add_row("DALI", f"[yellow]not available[/]: {dali['error']}")
    if torch["available"]:
        cuda = f"CUDA {torch['cuda_version']}: {', '.join(torch['devices'])}" if torch["cuda"] else "no CUDA (CPU)"
        t.add_row("torch", f"{torch['version']}; {cuda}; threads={torch['threads']} interop={torch['interop_threads']}")
    else:
        t.add_row("torch", f"[red]missing[/]: {torch['error']}")
    for k, v in r["packages"].items():
        t.add_row(k, str(v))
    Console().print(t)
