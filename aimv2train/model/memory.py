"""Bytes one AIMv2 training step holds on its device, by formula (the memory twin of flops.py).

Counted per tensor autograd keeps for backward in eager mode, per token of each pre-norm block (dim D,
SwiGLU width F, `act` bytes per activation: 2 under bf16 autocast, 4 in fp32):

    norms: an fp32 copy of the input (4 D) and the normalised output (act D), twice
    linear inputs: qkv, proj, fc1/fc3 (act D each); q, k, v and the attention output (4 act D)
    SwiGLU: fc1 and fc3 outputs, silu's output, their product (4 act F)

so D (8 + 9 act) + 4 act F bytes per token; flash, memory-efficient and flex attention keep O(tokens)
besides. A dense-mask attention on the CPU (SDPA's math path) also keeps its B x heads x N x N fp32
probabilities. With activation checkpointing a block keeps its input only and is recomputed, one at a
time, in backward. The heads keep the pixel predictions and targets in fp32 and the caption logits'
fp32 log-softmax (B x T x V x 4 bytes: the largest single tensor at small images with many captions),
whose backward briefly holds two more of its size.

Weights, gradients and AdamW's two moments are fp32 (16 bytes a parameter); DDP adds its gradient
buckets (a copy of the gradients), FSDP2 divides the 16 by the ranks and gathers two blocks at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


def block_bytes(tokens: int, dim: int, hidden: int, act: int) -> int:
    """Bytes a pre-norm block keeps for backward over `tokens` tokens (module doc)."""
    return tokens * (dim * (8 + 9 * act) + 4 * act * hidden)


def block_params(dim: int, hidden: int) -> int:
    return 4 * dim * dim + 3 * dim * hidden + 2 * dim


@dataclass
class StepMemory:
    """Bytes on one device at the peak of a step (the start of backward), by what holds them."""
    weights: int
    gradients: int
    optimizer: int
    parallel: int      # DDP's gradient buckets, or FSDP2's gathered blocks
    batch: int         # the rank's whole batch on the device (images, patches, tokens)
    activations: int   # kept for backward by one micro-batch
    transient: int     # the largest short-lived buffers on top (logits' gradients, a recomputed block)

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.parallel + self.batch + self.activations
                + self.transient)


def activation_bytes(cfg: ModelConfig, num_patches: int, batch: int, text_len: int, act: int,
                     checkpointing: bool = False, dense_attention: bool = False) -> tuple[int, int]:
    """(kept for backward, transient peak on top) for `batch` images of `num_patches` patches with
    `text_len`-token captions."""
    enc, dec = cfg.encoder, cfg.decoder
    pix = enc.patch_size ** 2 * enc.in_chans
    seq = num_patches + max(text_len - 1, 0)
    tok_e, tok_d = batch * num_patches, batch * seq
    attn = batch * enc.heads * num_patches ** 2 * 4 + batch * num_patches ** 2 if dense_attention else 0
    blk_e, blk_d = block_bytes(tok_e, enc.dim, enc.mlp_hidden, act) + attn, block_bytes(tok_d, dec.dim,
                                                                                         dec.mlp_hidden, act)
    if checkpointing:
        blocks = act * (enc.depth * tok_e * enc.dim + dec.depth * tok_d * dec.dim)
        recompute = max(blk_e, blk_d)
    else:
        blocks, recompute = enc.depth * blk_e + dec.depth * blk_d, 0
    edges = (tok_e * (pix * act + 2 * enc.dim * (4 + act))      # pixels into the patch embedding, two norms
             + tok_e * enc.dim * act + tok_d * dec.dim * (4 + act))  # the decoder's input projection, final norm
    pixel_head = batch * (num_patches - 1) * (dec.dim * act + pix * (act + 12))  # input, pred; fp32 pred/target/diff
    text = batch * text_len * (dec.dim * act + 4 * dec.vocab_size)  # input; fp32 log-softmax
    logits_backward = batch * text_len * dec.vocab_size * (8 + act)
    block_backward = recompute + 4 * max(tok_e * (enc.mlp_hidden + enc.dim), tok_d * (dec.mlp_hidden + dec.dim))
    return blocks + edges + pixel_head + text, max(logits_backward, block_backward)


def step_memory(cfg: ModelConfig, params: int, num_patches: int, batch: int, text_len: int, *, act: int,
                micro_batches: int = 1, checkpointing: bool = False, dense_attention: bool = False,
                parallel: str = "none", world_size: int = 1, gather_bytes: int = 4) -> StepMemory:
    """Peak bytes of a step on `batch` images per rank split into `micro_batches` (the largest micro-batch
    counts); `parallel` none | ddp | fsdp, `gather_bytes` FSDP2's compute dtype for the gathered blocks."""
    micro = -(-batch // max(1, min(micro_batches, batch)))
    kept, transient = activation_bytes(cfg, num_patches, micro, text_len, act, checkpointing, dense_attention)
    pix = cfg.encoder.patch_size ** 2 * cfg.encoder.in_chans
    inputs = batch * (2 * num_patches * pix * 4 + text_len * 8)
    shard = world_size if parallel == "fsdp" else 1
    if parallel == "ddp":
        extra = 4 * params
    elif parallel == "fsdp":
        enc, dec = cfg.encoder, cfg.decoder
        largest = max(block_params(enc.dim, enc.mlp_hidden), block_params(dec.dim, dec.mlp_hidden))
        root = 2 * dec.vocab_size * dec.dim + dec.max_text_len * dec.dim
        extra = gather_bytes * (2 * largest + root) * 2  # parameters and their unsharded gradients
    else:
        extra = 0
    return StepMemory(weights=4 * params // shard, gradients=4 * params // shard, optimizer=8 * params // shard,
                      parallel=extra, batch=inputs, activations=kept, transient=transient)
