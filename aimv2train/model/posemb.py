"""Position embeddings: a learned table for fixed-resolution models, 2D sin-cos for native resolution.

Channel layout of the sin-cos table is [sin x | cos x | sin y | cos y] with x the column (width) and y
the row (height), tokens row-major. This is MAE's `get_2d_sincos_pos_embed` (whose `emb_h` is, by a
naming slip, computed from the column index) as shipped in ml-aim's `SinCosPosEmbed`, and what
transformers' Aimv2 `is_native` path produces after rotating its h-first table. Frequencies are computed
in float64, as transformers does, so the table matches it bit for bit after the cast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d(h: int, w: int, dim: int, *, temperature: float = 10000.0,
              device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h*w, dim) table for an h x w patch grid."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    f64 = torch.float32 if device is not None and torch.device(device).type == "mps" else torch.float64
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=f64, device=device) / quarter)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=f64, device=device),
                            torch.arange(w, dtype=f64, device=device), indexing="ij")
    ex = xs.reshape(-1, 1) * omega  # (h*w, dim/4)
    ey = ys.reshape(-1, 1) * omega
    return torch.cat([ex.sin(), ex.cos(), ey.sin(), ey.cos()], dim=1).to(dtype)


def resize_learned(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased resample of a learned (1, h*w, D) table to another grid, exactly timm's
    `resample_abs_pos_embed` (no prefix tokens), so a fixed-resolution model can still embed images at
    another resolution. antialias only changes a downsampled axis (a low-pass filter before sampling)."""
    if tuple(old) == tuple(new):
        return pos
    D = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], D).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new, mode="bicubic", antialias=True, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], D).to(pos.dtype)
