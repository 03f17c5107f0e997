import click

from aimv2data.manifest.captions import JOIN_KEYS
from aimv2data.manifest.schema import MAX_CAPTION_BYTES


@click.group()
def caption():
    """Synthetic caption sets: attach one to a manifest, or generate one with a local model."""


@caption.command()
@click.argument("manifest")
@click.option("--captions", "captions_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Caption set: .parquet or .jsonl with a key column and a caption column (str or list[str]).")
@click.option("--on", type=click.Choice(JOIN_KEYS), required=True,
              help="Manifest column to join on (uid for DataComp/DataCompDR, url or sha256 for Recap-DataComp).")
@click.option("--column", required=True, help="Caption column in the set, e.g. re_caption.")
@click.option("--name", help="Set name; the manifest column becomes syn_<name>. Default: --column.")
@click.option("--key-column", help="Key column in the set when it is not named like --on.")
@click.option("--memory-limit", default="1GB", show_default=True,
              help="Memory for the join (DuckDB; spills to disk beyond it), whatever the caption set's size.")
@click.option("--max-caption-bytes", default=MAX_CAPTION_BYTES, show_default=True,
              help="Caption limit in UTF-8 bytes. Longer captions are dropped (and counted).")
def attach(manifest, captions_file, on, column, name, key_column, memory_limit, max_caption_bytes):
    """Join a caption set into MANIFEST as syn_<name> (list[str]); several captions per sample allowed.

    MANIFEST: a local directory or a URL (s3://bucket/manifest). Rewrites each samples part atomically, one
    at a time (an interrupted attach resumes with the parts left); re-attaching a name replaces it. Reports
    matched and unmatched rows and records the set in _manifest.json.
    """
    from aimv2data.manifest.captions import CaptionError
    from aimv2data.manifest.captions import attach as do_attach

    try:
        r = do_attach(manifest, captions_file, on=on, column=column, name=name, key_column=key_column,
                      memory_limit=memory_limit, max_caption_bytes=max_caption_bytes)
    except (CaptionError, OSError) as e:
        raise click.ClickException(str(e)) from None
    total = r["matched_rows"] + r["unmatched_rows"]
    pct = 100 * r["matched_rows"] / total if total else 0.0
    click.echo(f"{r['column']}: {r['matched_rows']} of {total} samples matched on {on} ({pct:.1f}%), "
               f"{r['unmatched_rows']} unmatched; {r['captions']} captions attached; "
               f"{r['unused_keys']} of {r['keys']} caption-set keys matched no sample"
               + (f"; {r['captions_too_large']} captions above --max-caption-bytes dropped"
                  if r["captions_too_large"] else ""))


@caption.command()
@click.argument("manifest")
@click.option("--model", required=True, type=click.Path(exists=True, file_okay=False),
              help="Local HF image-to-text model folder (save_pretrained: config, weights, image processor, "
              "tokenizer), e.g. a BLIP, GIT or VisionEncoderDecoder captioner. Nothing is downloaded.")
@click.option("-o", "--output",
              help="Output file. The caption set to write (.parquet or .jsonl; a path or a URL). Default: "
              "MANIFEST/captions/<model>.parquet.")
@click.option("--distributor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: one Ray task per manifest part (a GPU per task where the cluster has GPUs).")
@click.option("--ray-address", default=None, help="--distributor ray: the Ray cluster (host:port or "
              "ray://...). Default: what ray.init finds.")
@click.option("--name", default="caption", show_default=True, help="Caption column name in the output set.")
@click.option("--batch-size", default=16, show_default=True, help="Images per generate() call.")
@click.option("--max-new-tokens", default=30, show_default=True, help="Caption length limit in tokens.")
@click.option("--num-beams", default=1, show_default=True, help="Beam search width (1 = greedy).")
@click.option("--device", default="auto", show_default=True, help="torch device: cpu, cuda or cuda:N. auto: cuda when "
              "available, else cpu.")
@click.option("--limit", type=int, help="Only the first N rows (a quick trial). Here: samples "
              "captioned.")
def generate(manifest, model, output, distributor, ray_address, name, batch_size, max_new_tokens, num_beams, device, limit):
    """Caption MANIFEST's images with a local model; writes a caption set that `attach` takes.

    Images are read by offset from the tars. Interrupted runs resume (work is kept per samples part in
    OUTPUT.parts/ until the set is complete).
    """
    from aimv2data.manifest.captions import CaptionError
    from aimv2data.manifest.captions import generate as do_generate

    try:
        r = do_generate(manifest, model, output=output, name=name, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, num_beams=num_beams, device=device, limit=limit,
                        distributor=distributor, ray_address=ray_address)
    except (CaptionError, OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{r['captioned']} captions by {r['model']} on {r['device']} -> {r['output']}"
               + (f"; {r['failed']} images could not be read" if r["failed"] else ""))
    for f in r["failures"]:
        click.echo(f"  skipped {f}", err=True)
    click.echo(f"next: aimv2 caption attach {manifest} --captions {r['output']} --on sha256 --column {name} "
               f"--name <set name>")
