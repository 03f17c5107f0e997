"""Prefix attention for the encoder (paper §2.2, after AIM v1).

Indices are 0-based. A sample with prefix length M (1 <= M <= I-1) lets query i attend key j iff
j < M (the prefix is seen by everyone, bidirectionally) or j <= i (causal after the prefix). Position i
of the decoder predicts patch i+1; patch t counts in the pixel loss iff t >= M, i.e. the paper's
1-based {x_i | i > M}: the prefix patches 1..M-1 are visible to the position that would predict them.
At inference the encoder runs with no mask (fully bidirectional).
"""
from __future__ import annotations

import torch

from .config import ATTENTION_KINDS


def sample_prefix_lengths(batch: int, num_patches: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """M ~ U{1, ..., I-1} per sample, drawn on the generator's device (CPU by default), then moved."""
    if num_patches < 2:
        raise ValueError(f"prefix attention needs at least 2 patches per image, got {num_patches}")
    gen_device = generator.device if generator is not None else "cpu"
    m = torch.randint(1, num_patches, (batch,), generator=generator, device=gen_device)
    return m.to(device) if device is not None else m


def prefix_causal_mask(prefix_len: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, 1, I, I) boolean SDPA mask, True where query i may attend key j."""
    idx = torch.arange(num_patches, device=prefix_len.device)
    causal = idx[None, :] <= idx[:, None]  # (I, I): j <= i
    prefix = idx[None, None, :] < prefix_len[:, None, None]  # (B, 1, I): j < M
    return (causal[None] | prefix)[:, None]


def target_mask(prefix_len: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, I-1) boolean: True where prediction i (of patch i+1) counts in the pixel loss (i+1 >= M)."""
    targets = torch.arange(1, num_patches, device=prefix_len.device)
    return targets[None, :] >= prefix_len[:, None]


# ---------------------------------------------------------------------------- FlexAttention (fast kernel)



def resolve_attention(kind: str, device: torch.device | str) -> str:
    """"auto" -> "flex" on CUDA (block-sparse prefix mask, a fused kernel that skips masked-out blocks),
    "sdpa" elsewhere (FlexAttention has no backward on CPU; SDPA with the dense mask is the reference)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    if kind == "auto":
        return "flex" if torch.device(device).type == "cuda" else "sdpa"
    return kind


def prefix_mask_mod(prefix_len: torch.Tensor):
    """FlexAttention mask_mod of the prefix mask: the same rule as prefix_causal_mask, element by element,
    with one prefix length per batch index b."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prefix_len[b])

    return mask_mod


BLOCK = 128  # FlexAttention's default tile, queries and keys


@torch.compiler.disable  # built eagerly, outside any compiled graph (as torchtitan does), then passed in
def prefix_block_mask(prefix_len: torch.Tensor, num_patches: int, block: int = BLOCK):
    """The prefix mask as a FlexAttention BlockMask (B, 1, I, I), computed per tile from the prefix lengths
    alone (O(B (I/128)^2), no (B, I, I) tensor is ever built, which create_block_mask would evaluate):
    a key tile wholly below the diagonal tile (j < i) or wholly inside the prefix (its last key < M) is
    full (no mask applied); the diagonal tile, tiles that start inside the prefix and tiles that reach
    past the last patch are partial (mask_mod and the bounds decide per element); the rest are skipped, so the
    kernel does about half the dense square's work.
    tests/test_model_attention.py checks it against create_block_mask and the dense mask."""
    from torch.nn.attention.flex_attention import BlockMask

    n_blocks = -(-num_patches // block)
    idx = torch.arange(n_blocks, device=prefix_len.device)
    qi, kj = idx[:, None], idx[None, :]  # (nq, nk) tile coordinates
    kv_first = (kj * block)[None]  # first key of each tile
    kv_last = (torch.clamp((kj + 1) * block, max=num_patches) - 1)[None]
    m = prefix_len.to(idx.device)[:, None, None]
    full = (kj < qi)[None] | (kv_last < m)  # (B, nq, nk)
    if num_patches % block:  # tiles that reach into the padding stay partial, as create_block_mask has them
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial = ((kj <= qi)[None] | (kv_first < m)) & ~full

    def as_indices(tiles):  # (B, 1, nq) counts, (B, 1, nq, nk) tile ids, the used ones first
        order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
        return tiles.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = as_indices(partial)
    full_num, full_idx = as_indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=prefix_mask_mod(prefix_len), seq_lengths=(num_patches, num_patches))
