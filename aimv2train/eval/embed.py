"""Image features from a trained encoder (`aimv2 embed`): mean-pooled final-norm tokens, or all tokens.

Images stream through in batches (fixed resolution) or in runs of equal grids (native resolution); an
image that fails to decode is skipped and named, the rest still embed. Results are written atomically:
FILE.npy (or .npz) plus FILE.json naming the image behind each row.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from aimv2data.atomic import atomic_write, write_json_atomic
from ..model.encoder import Encoder
from ..model.preprocess import fixed_resolution, load_rgb, native_resolution

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Embeddings:
    rows: list[str] = field(default_factory=list)  # image path of each row
    pooled: list[np.ndarray] = field(default_factory=list)  # (D,) per row
    tokens: list[np.ndarray] = field(default_factory=list)  # (h*w, D) per row, when asked for
    grids: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0


def expand_inputs(paths) -> list[Path]:
    """Files as given; directories expanded to the image files under them, sorted."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


@torch.inference_mode()
def embed_images(encoder: Encoder, paths, *, resolution: int | None = None, max_patches: int | None = None,
                 keep_tokens: bool = False, batch_size: int = 16, device: str = "cpu",
                 progress: bool = True) -> Embeddings:
    """Exactly one of `resolution` (fixed R x R) and `max_patches` (native aspect, h*w <= A) is set."""
    if (resolution is None) == (max_patches is None):
        raise ValueError("pass exactly one of resolution= (fixed) and max_patches= (native resolution)")
    p = encoder.cfg.patch_size
    if resolution is not None and resolution % p:
        raise ValueError(f"--resolution {resolution} is not a multiple of the patch size {p}")
    encoder = encoder.to(device).eval()
    out, t0 = Embeddings(), time.perf_counter()
    pending: list[tuple[str, torch.Tensor]] = []

    def flush():
        x = torch.stack([t for _, t in pending]).to(device)
        z = encoder(x).float()
        grid = (x.shape[2] // p, x.shape[3] // p)
        for (name, _), zi in zip(pending, z.cpu().numpy()):
            out.rows.append(name)
            out.grids.append(grid)
            out.pooled.append(zi.mean(axis=0))
            if keep_tokens:
                out.tokens.append(zi)
        pending.clear()

    for path in tqdm(expand_inputs(paths), desc="embed", unit="img", disable=not progress):
        try:
            img = load_rgb(path)
            x = fixed_resolution(img, resolution) if resolution else native_resolution(img, max_patches, p)
        except Exception as e:  # noqa: BLE001 - any undecodable file is skipped and named, not fatal
            out.skipped.append((str(path), f"{type(e).__name__}: {e}"))
            continue
        if pending and (len(pending) == batch_size or pending[0][1].shape != x.shape):
            flush()
        pending.append((str(path), x))
    if pending:
        flush()
    out.seconds = time.perf_counter() - t0
    return out



def write_embeddings(emb: Embeddings, output: str | os.PathLike, meta: dict) -> tuple[Path, Path, tuple]:
    """FILE.npy: pooled (n, D), or with tokens (n, h*w, D) when every image has the same grid.
    FILE.npz: `pooled` (n, D), `grids` (n, 2) and, with tokens, `tokens_{row:05d}` (h*w, D) per row.
    FILE.json: rows (image per row), skipped images and `meta`. Returns (array file, json file, shape)."""
    output = Path(output)
    if output.suffix not in (".npy", ".npz"):
        raise ValueError(f"--output must end in .npy or .npz, got {output.name}")
    if not emb.rows:
        why = "; ".join(f"{Path(p).name}: {r}" for p, r in emb.skipped[:3])
        raise ValueError("no image could be embedded; nothing written" + (f" ({why})" if why else ""))
    pooled = np.stack(emb.pooled).astype(np.float32)
    if output.suffix == ".npy":
        if emb.tokens:
            if len(set(emb.grids)) > 1:
                raise ValueError("token arrays of different grids cannot share one .npy; write .npz")
            array = np.stack(emb.tokens).astype(np.float32)
        else:
            array = pooled
        atomic_write(output, lambda t: _np_write(t, np.save, array))
        shape = array.shape
    else:
        arrays = {"pooled": pooled, "grids": np.asarray(emb.grids, dtype=np.int32)}
        arrays.update({f"tokens_{i:05d}": t.astype(np.float32) for i, t in enumerate(emb.tokens)})
        atomic_write(output, lambda t: _np_write(t, np.savez, **arrays))
        shape = pooled.shape
    sidecar = output.with_suffix(".json")
    doc = {**meta, "rows": emb.rows, "grids": [list(g) for g in emb.grids],
           "skipped": [{"path": p, "reason": r} for p, r in emb.skipped], "array_shape": list(shape)}
    write_json_atomic(doc, sidecar)
    return output, sidecar, shape


def _np_write(path: str, save, *args, **kwargs) -> None:
    """np.save / np.savez into exactly `path` (given a name, numpy would append .npy / .npz to it)."""
    with open(path, "wb") as f:
        save(f, *args, **kwargs)
