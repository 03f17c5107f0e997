import os

import click

from cli.flags import option


@click.command()
@click.option("--source", type=click.Choice(["coyo", "dfn", "parquet"]),
              help="coyo: COYO-700M parquet (id, url, text, width, height). dfn: DataComp pool parquet (uid, url, "
                   "text, original_width, original_height, sha256) filtered by --dfn-index. parquet: any parquet, "
                   "columns named by --url-col/--caption-col. [required, except with --retry-failed]")
@click.option("--url-list", "url_lists", multiple=True, metavar="PATH",
              help="A url list parquet, or a directory of them (*.parquet, in name order). Repeatable. "
                   "[required, except with --retry-failed]")
@click.option("-o", "--output", required=True, metavar="DIR",
              help="Output folder. New, empty, or an earlier fetch of the same lists with the same flags (resumes). "
              "A local path or a URL (s3://bucket/prefix; credentials and endpoint from the standard AWS_* "
              "variables and config files, never printed or stored).")
@click.option("--retry-failed", is_flag=True,
              help="Download again only the samples whose last attempt failed transiently (time-out, connection "
              "error, HTTP 429/5xx) into new shards of DIR; 404/403, non-images and bombs are left alone. With the "
              "original flags, or with --output DIR alone (the rest is read from DIR's own record).")
@click.option("--ray-address", default=None,
              help="--distributor ray: the Ray cluster (host:port or ray://...). Default: what ray.init finds.")
@click.option("--dfn-index", metavar="FILE.npy",
              help="dfn: the DFN uid index, a sorted .npy of dtype u8,u8 (uid high half, low half). Only pool "
                   "rows whose uid is in it are fetched; the rest are never requested.")
@click.option("--url-col", default="url", show_default=True, help="parquet: the column holding image urls.")
@click.option("--caption-col", default="caption", show_default=True,
              help="parquet: the column holding captions; '' for none (no KEY.txt).")
@click.option("--processes", type=click.IntRange(min=1), default=max(1, os.cpu_count() or 1), show_default="CPU count",
              help="img2dataset download processes (each works on one shard at a time).")
@option("--download-threads", "threads", type=click.IntRange(min=1), default=64, show_default=True, old=("--threads",),
        help="Download threads per process.")
@click.option("--shard-size", type=click.IntRange(min=1), default=10_000, show_default=True, help="Samples per tar shard.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows (a quick trial). "
              "Here: rows left after filtering.")
@click.option("--max-side", type=click.IntRange(min=0), default=2048, show_default=True,
              help="Downscale images whose long side is larger to this, aspect kept; smaller images keep their "
                   "native size (never upscaled). 0: never resize.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=178_956_970, show_default=True,
              help="Decompression-bomb guard: images with more pixels than this (by their header) are refused. "
                   "Before decoding; the default is Pillow's own limit.")
@click.option("--distributor", type=click.Choice(["multiprocessing", "pyspark", "ray"]), default="multiprocessing",
              show_default=True, help="img2dataset's distributor; ray spreads shards over a Ray cluster (--ray-address); "
              "pyspark over a Spark session you start (untested here, see docs/fetch.md).")
@click.option("--timeout", type=click.IntRange(min=1), default=10, show_default=True, help="Seconds before a download gives up.")
@click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True, help="Extra attempts per failed download.")
@click.option("--verify-hash/--no-verify-hash", default=None,
              help="dfn: drop images whose sha256 differs from the pool's (the image changed since DataComp "
                   "indexed it). Default: on for dfn when the pool has a sha256 column.")
@click.option("--keep-progressive", is_flag=True,
              help="Keep progressive JPEGs as they are instead of re-encoding them to baseline "
                   "(nvJPEG's hardware decoder takes baseline only).")
@click.option("--allow-private-addresses", is_flag=True,
              help="Also fetch from private and loopback addresses (10/8, 172.16/12, 192.168/16, 127/8, ::1, "
              "fc00::/7, ...), refused by default: for a url list served on your own network or on 127.0.0.1. "
              "Link-local addresses (169.254/16, fe80::/10: cloud credential services) stay refused.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, show_default=True,
              help="JPEG quality for images that must be re-encoded (PNG, WebP, progressive, downscaled).")
def fetch(**kw):
    """Download url lists into webdataset shards (DIR/NNNNN.tar) with img2dataset, at native resolution.

    Baseline JPEGs no larger than --max-side are stored byte for byte; everything else is re-encoded to
    baseline JPEG. Failures are counted by reason, never fatal. Rerunning the same command resumes: finished
    shards are kept as they are, partial ones are redone. Shows a progress line, then a summary, also in
    DIR/fetch_summary.json; img2dataset's own output goes to DIR/_logs/img2dataset.log.
    """
    from rich.console import Console

    from aimv2data.fetch import FetchError, FetchIncomplete, FetchOptions, fetch as run

    kw["url_lists"] = list(kw["url_lists"])
    if not kw["retry_failed"] and (not kw["source"] or not kw["url_lists"]):
        raise click.UsageError("--source and --url-list are required (except with --retry-failed --output DIR)")
    kw["caption_col"] = kw["caption_col"] or None
    try:
        run(FetchOptions(**kw), console=Console())
    except FetchError as e:
        # a refused input (a folder's state, a url list, a value the fetch judges) is 1, not click's usage
        # code 2: docs/contracts.md
        raise click.ClickException(f"--{e.param}: {e}" if e.param and not str(e).startswith(f"--{e.param}")
                                   else str(e)) from e
    except FetchIncomplete as e:
        click.echo(f"Error: {e}", err=True)
        raise SystemExit(e.exit_code) from e
