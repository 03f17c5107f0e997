"""FLOPs of one AIMv2 training step by formula (matmuls only, 2 FLOPs per multiply-add).

Counted the way torch.utils.flop_counter.FlopCounterMode counts: linear/conv layers and the two
attention matmuls (QK^T and AV) over the full square, even where the prefix or causal mask zeroes half
of it. Norms, activations, softmax and the embedding lookup are left out (they are O(N*D)).
Backward costs twice the forward, except the patch embedding, which needs no gradient for the pixels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from aimv2data.paper import TEXT_LEN

from .config import DecoderConfig, EncoderConfig, ModelConfig


def transformer_flops(tokens: int, dim: int, mlp_hidden: int, depth: int) -> int:
    """Forward FLOPs of `depth` blocks over one sequence of `tokens`."""
    qkv_proj = 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim
    attention = 2 * 2 * tokens * tokens * dim  # QK^T and AV, all heads together
    mlp = 3 * 2 * tokens * dim * mlp_hidden
    return depth * (qkv_proj + attention + mlp)


def encoder_flops(cfg: EncoderConfig, grid: tuple[int, int]) -> dict[str, int]:
    n = grid[0] * grid[1]
    patch = 2 * n * cfg.in_chans * cfg.patch_size ** 2 * cfg.dim
    return {"patch_embed": patch, "blocks": transformer_flops(n, cfg.dim, cfg.mlp_hidden, cfg.depth)}


def decoder_flops(cfg: DecoderConfig, encoder_dim: int, num_patches: int, text_len: int) -> int:
    seq = num_patches + max(text_len - 1, 0)  # the last caption token is never an input
    return 2 * num_patches * encoder_dim * cfg.dim + transformer_flops(seq, cfg.dim, cfg.mlp_hidden, cfg.depth)


def heads_flops(cfg: ModelConfig, num_patches: int, text_len: int) -> int:
    pixel = 2 * (num_patches - 1) * cfg.decoder.dim * cfg.encoder.patch_size ** 2 * cfg.encoder.in_chans
    return pixel + 2 * text_len * cfg.decoder.dim * cfg.decoder.vocab_size


@dataclass
class StepFlops:
    encoder: int  # forward, whole batch
    decoder: int
    heads: int
    forward: int
    train: int  # forward + backward

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def step_flops(cfg: ModelConfig, grid: tuple[int, int], batch: int = 1, text_len: int = TEXT_LEN) -> StepFlops:
    """FLOPs of one training step on `batch` images of `grid` patches with `text_len`-token captions
    (text_len=0: image loss only)."""
    n = grid[0] * grid[1]
    enc = encoder_flops(cfg.encoder, grid)
    encoder = batch * (enc["patch_embed"] + enc["blocks"])
    decoder = batch * decoder_flops(cfg.decoder, cfg.encoder.dim, n, text_len)
    heads = batch * heads_flops(cfg, n, text_len)
    forward = encoder + decoder + heads
    train = 3 * forward - batch * enc["patch_embed"]
    return StepFlops(encoder, decoder, heads, forward, train)


def encoder_train_flops(cfg: EncoderConfig, grid: tuple[int, int], batch: int = 1) -> int:
    """Forward + backward FLOPs of the encoder alone (what benchmarks/bench_model.py times)."""
    enc = encoder_flops(cfg, grid)
    return batch * (3 * (enc["patch_embed"] + enc["blocks"]) - enc["patch_embed"])
