import click

from aimv2data.paper import EVAL_MAX_PATCHES


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--checkpoint", "-c", required=True, type=click.Path(exists=True),
              help="Encoder weights: a training run directory (newest checkpoint), a checkpoint file, a transformers "
                   "Aimv2VisionModel folder or ml-aim weights (.pth/.safetensors).")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="Output file. FILE.npy: pooled features (n, D), or (n, h*w, D) with --tokens at a fixed resolution. "
                   "FILE.npz: `pooled`, `grids` and per-image `tokens_NNNNN`. FILE.json names each row.")
@click.option("--tokens", is_flag=True, help="Keep every final-norm token instead of the mean over tokens.")
@click.option("--resolution", type=int, default=None,
              help="Fixed resolution R in pixels. Shorter side to R, centre crop R x R (a multiple of the patch size). "
                   "Default for learned-position models: the resolution they were trained at.")
@click.option("--native-res", is_flag=True,
              help="Native resolution. Each image keeps its aspect ratio on at most --max-patches patches (the "
                   "default for sin-cos trunks).")
@click.option("--max-patches", type=click.IntRange(min=1), default=EVAL_MAX_PATCHES, show_default=True,
              help="Patch budget A per image with --native-res (h*w <= A); smaller images keep their own size. "
              "The default, a 224 px image's grid, is the same in `aimv2 embed` and `aimv2 probe`.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Images per forward pass (native resolution batches runs of equal grids).")
@click.option("--device", default=None, help="torch device: cpu, cuda or cuda:N. Default: cuda when available, else cpu.")
@click.option("--heads", type=int, default=None,
              help="Attention heads, only for bare state dicts whose width is not a multiple of 128.")
def embed(images, checkpoint, output, tokens, resolution, native_res, max_patches, batch_size, device, heads):
    """Embed IMAGES (files or directories) with an AIMv2 encoder into a .npy/.npz of features."""
    if resolution is not None and native_res:
        raise click.UsageError("--resolution and --native-res are exclusive: pick one")
    if not output.endswith((".npy", ".npz")):  # before the work and the imports (torch), not after them
        raise click.UsageError(f"--output must end in .npy or .npz, got {output}")
    import torch
    from rich.console import Console

    from aimv2train.eval.embed import embed_images, write_embeddings
    from aimv2train.eval.weights import load_weights

    console = Console(stderr=True)
    try:
        encoder = load_weights(checkpoint, heads=heads)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    cfg = encoder.cfg
    if resolution is None and not native_res:
        native_res = cfg.pos_embed == "sincos"
        resolution = None if native_res else cfg.img_size
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    mode = f"native, <= {max_patches} patches" if native_res else f"{resolution}px"
    console.print(f"encoder {cfg.dim}x{cfg.depth} ({cfg.pos_embed} positions) from {checkpoint}; {mode}; {device}")
    try:
        emb = embed_images(encoder, images, resolution=None if native_res else resolution,
                           max_patches=max_patches if native_res else None, keep_tokens=tokens,
                           batch_size=batch_size, device=device)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    meta = {"checkpoint": str(checkpoint), "mode": "native" if native_res else "fixed",
            "resolution": resolution, "max_patches": max_patches if native_res else None,
            "pooling": "none" if tokens else "mean", "dim": cfg.dim}
    try:
        array_path, sidecar, shape = write_embeddings(emb, output, meta)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    n = len(emb.rows)
    console.print(f"[green]embedded {n} images[/] in {emb.seconds:.1f}s ({n / max(emb.seconds, 1e-9):.1f} img/s) "
                  f"-> {array_path} {tuple(shape)}, rows named in {sidecar}")
    if emb.skipped:
        console.print(f"[yellow]skipped {len(emb.skipped)} unreadable images:[/]")
        for path, reason in emb.skipped[:10]:
            console.print(f"  {path}: {reason}")
        if len(emb.skipped) > 10:
            console.print(f"  ... and {len(emb.skipped) - 10} more (all listed in {sidecar})")
