import click

from cli.flags import option
from cli.options import decoder_option, require_manifest


@click.command()
@click.argument("manifest", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Output folder. The PNG pages and index.html go there (open index.html in a browser).")
@click.option("--native-res", is_flag=True,
              help="Native resolution. Per step an area A = 2^n patches (n from a truncated normal on 7..12) and "
              "B = C / A images.")
@click.option("--batch-patches", "-C", type=int, default=2**16, show_default=True,
              help="C: patches per step per rank with --native-res (a power of two >= 4096).")
@click.option("--batch-rule", type=click.Choice(["area", "grid"]), default="area", show_default=True,
              help="--native-res batch size: area = C / A; grid = C // (h*w).")
@click.option("--resolution", "-R", type=int, default=224, show_default=True,
              help="Fixed resolution R in pixels. RandomResizedCrop to R x R, as `aimv2 train -R`.")
@click.option("--batch-size", "-B", type=int, default=256, show_default=True,
              help="Images per step per rank at fixed resolution (as `aimv2 train -B`).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed. It seeds the sampler, as `aimv2 train --seed` does.")
@click.option("--mix", default=None, metavar="SRC=W,...",
              help="Source mixture, e.g. dfn=0.60,coyo=0.06,hqitp=0.31: each source its own stream with its own "
              "epochs. Default: the paper's Table 2 over the sources present; 'rows': as the manifest has them.")
@option("--segment", type=int, default=0, show_default=True, old=("--epoch",),
              help="Start at this loader segment (a stretch of steps in which no source changes epoch; 0 is "
              "the first; one per `iter(loader)`), then go on in the order training reads the steps.")
@click.option("--batches", type=int, default=4, show_default=True, help="Contact sheets: the first N steps.")
@click.option("--scan", type=int, default=1024, show_default=True,
              help="Look at most this many steps ahead for the sheets and the area pages (only the shown steps "
              "are decoded).")
@click.option("--per-sheet", type=int, default=16, show_default=True, help="Images shown per contact sheet.")
@click.option("--areas", default="", help="Only steps at these areas, comma-separated (e.g. 256,1024).")
@decoder_option("--image-decoder", "decoder", help_prefix="Image decoder of the loader: ", old=("--decoder",))
def preview(manifest, output, native_res, batch_patches, batch_rule, resolution, batch_size, seed, mix, segment,
            batches, scan, per_sheet, areas, decoder):
    """See the batches the loader makes from MANIFEST: PNG contact sheets of real batches (each image as the
    model gets it: crop, resize, flip; with area, grid, bucket, source and the caption chosen), a page per
    area showing how a step fills the patch budget, and OUTPUT/index.html linking them."""
    require_manifest(manifest)
    from aimv2data.loader.samples import ManifestError
    from aimv2data.preview import preview as run

    try:
        area_list = [int(a) for a in areas.split(",") if a.strip()]
    except ValueError:
        raise click.BadParameter(f"{areas!r}: give areas as integers, e.g. 256,1024", param_hint="--areas") from None
    kw = (dict(native_res=True, batch_patches=batch_patches, batch_rule=batch_rule) if native_res
          else dict(resolution=resolution, batch_size=batch_size))
    try:
        r = run(manifest, output, batches=batches, per_sheet=per_sheet, areas=area_list, segment=segment, seed=seed,
                scan=scan, mix=mix, decoder=decoder, **kw)
    except (ManifestError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{len(r['sheets'])} contact sheets, {len(r['areas'])} area pages -> {r['index']}")
