import sys

import click

from aimv2data.buckets import MAX_ASPECT, NUM_BUCKETS
from aimv2data.manifest.inspect_image import DEFAULT_MAX_PIXELS, VERIFY_LEVELS
from aimv2data.manifest.schema import MAX_CAPTION_BYTES, MAX_IMAGE_BYTES, MAX_JSON_BYTES


@click.command()
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@click.option("-o", "--output", required=True,
              help="Output folder. The manifest directory to create or resume (MANIFEST/_manifest.json, samples/, "
              "rejects/): a local path or a URL (s3://bucket/manifest; credentials and endpoint from the standard "
              "AWS_* variables and config files).")
@click.option("--patch-size", default=14, show_default=True, help="Patch size in pixels, recorded for readers.")
@click.option("--workers", "-j", type=click.IntRange(min=0), default=0, show_default=True,
              help="Worker processes (0: the work runs in this process). Here: each shards whole tars (0 and 1 both run "
              "in this process). Default 0 as in every command but train (4): each worker is a fresh interpreter.")
@click.option("--distributor", type=click.Choice(["multiprocessing", "ray"]), default="multiprocessing",
              show_default=True, help="ray: one Ray task per tar on the cluster of --ray-address (same parts, "
              "resume and merge as multiprocessing).")
@click.option("--ray-address", default=None, help="--distributor ray: the Ray cluster (host:port or ray://...). "
              "Default: what ray.init finds (RAY_ADDRESS, a local `ray start`, else a new local one).")
@click.option("--part", metavar="i/N", help="Process only tars i, i+N, i+2N, ... of the sorted inputs "
              "(0 <= i < N), e.g. --part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT. The merge runs "
              "by itself once every tar is done.")
@click.option("--verify", type=click.Choice(VERIFY_LEVELS), default="header", show_default=True,
              help="header: read headers and walk each file to its end marker (no pixel decode; catches "
              "truncation). draft: also decode JPEGs at 1/8 scale and PNG/WebP fully. decode: fully decode "
              "everything (slowest, catches damage inside the compressed data).")
@click.option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True,
              help="Decompression-bomb guard: images with more pixels than this (by their header) are refused. "
              "Rejected as decompression bombs.")
@click.option("--max-image-bytes", default=MAX_IMAGE_BYTES, show_default=True,
              help="Reject samples whose image member is larger (by its tar header; never read): image_too_large.")
@click.option("--max-json-bytes", default=MAX_JSON_BYTES, show_default=True,
              help="Reject samples whose .json member is larger (never read): json_too_large.")
@click.option("--max-caption-bytes", default=MAX_CAPTION_BYTES, show_default=True,
              help="Caption limit in UTF-8 bytes. Samples whose .txt caption (or json `caption`) is longer are "
              "rejected: caption_too_large. Training uses 77 tokens of it.")
@click.option("--min-side", default=1, show_default=True, help="Reject images whose shorter display side is smaller.")
@click.option("--max-aspect", default=8.0, show_default=True,
              help="Reject images with max(w/h, h/w) above this (they would lose most of themselves to crop).")
@click.option("--buckets", "num_buckets", default=NUM_BUCKETS, show_default=True,
              help="Number of aspect-ratio buckets, log-spaced over 1/A..A (A = --bucket-max-aspect).")
@click.option("--bucket-max-aspect", default=MAX_ASPECT, show_default=True, help="Widest bucket aspect A.")
@click.option("--absolute-paths", is_flag=True, help="Store absolute tar paths (default: relative to MANIFEST).")
@click.option("--source", help="Source name for samples whose json has no `source` (default: the input folder's name).")
@click.option("--idx", type=click.Choice(["beside", "manifest", "none"]), default="beside", show_default=True,
              help="Where to write DALI .idx files of the kept samples: beside each tar (falls back to "
              "MANIFEST/idx/ when that folder is read-only or holds a foreign .idx), in MANIFEST/idx/, or nowhere.")
@click.option("--merge-only", is_flag=True, help="Only write _manifest.json from finished parts (INPUT optional: "
              "without it, every finished part in MANIFEST is merged).")
def shard(inputs, output, patch_size, workers, distributor, ray_address, part, verify, max_pixels, max_image_bytes,
          max_json_bytes, max_caption_bytes, min_side, max_aspect, num_buckets, bucket_max_aspect, absolute_paths,
          source, idx, merge_only):
    """Index webdataset tars into a native-resolution manifest (manifests/SPEC.md).

    INPUT: folders of shards (what `aimv2 fetch` writes), .tar files, or quoted glob patterns; local or URLs
    (s3://bucket/shards, read in ranged blocks, never copied to disk). Per tar:
    member offsets, display size from headers (EXIF applied), a cheap integrity check, an aspect bucket,
    alt-text; bad samples go to MANIFEST/rejects with a reason. Reruns skip finished tars.
    """
    from rich.console import Console

    from aimv2data.cluster import ClusterError
    from aimv2data.manifest.build import ManifestBuildError, build_manifest
    from aimv2data.storage import StorageError

    console = Console(stderr=True)
    try:
        if merge_only:
            _merge_only(console, inputs, output)
            return
        r = build_manifest(inputs, output, workers=workers, part=part, argv=sys.argv[1:], patch_size=patch_size,
                           distributor=distributor, ray_address=ray_address,
                           verify=verify, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect,
                           max_image_bytes=max_image_bytes, max_json_bytes=max_json_bytes,
                           max_caption_bytes=max_caption_bytes,
                           num_buckets=num_buckets, bucket_max_aspect=bucket_max_aspect,
                           absolute_paths=absolute_paths, source=source, idx=idx)
    except (ManifestBuildError, ValueError, StorageError, ClusterError) as e:
        raise click.ClickException(str(e)) from None
    console.print(_summary_table(r, output, part, workers))
    if r["failed"]:
        raise SystemExit(1)


def _merge_only(console, inputs, output) -> None:
    """--merge-only: _manifest.json from the finished parts, nothing sharded."""
    from aimv2data.manifest.build import ManifestBuildError, merge_manifest

    if "://" in output and not output.startswith("file://"):
        raise ManifestBuildError(f"--merge-only takes a local MANIFEST; for {output} rerun the same "
                                 "`aimv2 shard` command: it skips finished tars and merges")
    m = merge_manifest(output, list(inputs) or None, argv=sys.argv[1:])
    c = m["counts"]
    console.print(f"merged {c['shards']} tars: {c['samples']} samples, {c['rejects']} rejects "
                  f"-> {output}/_manifest.json")


def _summary_table(r: dict, output, part, workers):
    """What this run did: tars, throughput, kept and rejected samples, .idx files, whether it merged."""
    from rich.table import Table

    t = Table(title=f"aimv2 shard -> {output}", show_header=False)
    scope = f" (part {part}: {r['tars_in_part']} of {r['tars']})" if part else ""
    t.add_row("tars", f"{r['processed']} processed, {r['skipped']} already done, {len(r['failed'])} failed{scope}")
    rate = r["samples_processed"] / r["seconds"] if r["seconds"] > 0 else 0.0
    t.add_row("this run", f"{r['samples_processed']} samples in {r['seconds']:.1f} s ({rate:.0f}/s, {workers} workers)")
    total = r["samples"] + r["rejects"] - r.get("tar_problems", 0)   # samples, not rows about a whole tar
    t.add_row("kept", f"{r['samples']} of {total}" + (f" ({100 * r['samples'] / total:.1f}%)" if total else ""))
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["per_reason"].items(), key=lambda kv: -kv[1]))
    t.add_row("rejected", f"{r['rejects']}" + (f": {reasons}" if reasons else ""))
    if r["per_reason"].get("missing_from_tar"):
        t.add_row("[red]lost[/]", f"{r['per_reason']['missing_from_tar']} samples img2dataset's NNNNN.parquet lists "
                  "are not in their (damaged or truncated) tar: see MANIFEST/rejects")
    where = {"beside": "beside their tar", "manifest": "in MANIFEST/idx/",
             "none": "without (no kept sample or --idx none)"}
    t.add_row("DALI .idx", ", ".join(f"{v} tars {where[k]}" for k, v in r["idx"].items()) or "-")
    if r["merged"]:
        t.add_row("manifest", "_manifest.json written; samples/*.parquet and rejects/*.parquet are plain parquet")
    elif not r["failed"]:
        t.add_row("manifest", f"not merged yet: {r['missing']} tars still to shard (other parts), "
                  "or run `aimv2 shard ... --merge-only`")
    for path, err in r["failed"][:10]:
        t.add_row("[red]failed[/]", f"{path}: {err}")
    return t
