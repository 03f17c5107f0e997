import click

from cli.options import require_manifest


@click.command()
@click.argument("manifest", type=click.Path(exists=True, file_okay=False))
@click.option("--val-fraction", default=0.01, show_default=True,
              help="Share of samples held out (by a hash of the key: the same split on every rerun).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Output folder. OUTPUT/train and OUTPUT/val, each a manifest (manifests/SPEC.md).")
def split(manifest, val_fraction, output):
    """Split MANIFEST into train and held-out manifests for `aimv2 train --val-manifest`.

    A sample goes to val when blake2b(key) / 2^64 < --val-fraction: deterministic, no sample in both,
    and growing the data keeps every old sample on its side. Rejects stay in MANIFEST.

    \b
    aimv2 split MANIFEST --val-fraction 0.01 -o SPLIT
    aimv2 train -m SPLIT/train --val-manifest SPLIT/val --val-every 500 ...
    """
    require_manifest(manifest)
    from aimv2data.manifest.split import split_manifest

    try:
        r = split_manifest(manifest, output, val_fraction)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    total = r["train"] + r["val"]
    click.echo(f"{total} samples -> {r['train']} train ({r['train_dir']}), {r['val']} val ({r['val_dir']}, "
               f"{100 * r['val'] / max(total, 1):.2f}%)")
