"""AIMv2 for pre-training: encoder (prefix attention) -> multimodal causal decoder -> two bias-free
heads, pixels (p*p*3) and vocabulary.

The decoder sees [image tokens (I) | caption tokens 0..T-2]; position i < I-1 predicts patch i+1, position
I-1 (the last image token) predicts caption token 0, and caption position t predicts token t+1. The
last caption token is never an input, since nothing after it is scored.

The trainer calls

    loss, parts = model.training_loss(batch.images, batch.patches, batch.tokens, pad_id, generator=g)

with a CPU torch.Generator for reproducible prefix lengths; parts holds the detached loss terms named
in LOSS_TERMS and the prefix lengths drawn. A Batch's images and patches are uint8 (docs/contracts.md):
training_loss normalises them where they are (on the device, inside a compiled step's graph); float
images and patches are taken as normalised already (synthetic batches, tests).

The encoder's prefix mask runs on one of two kernels (`set_attention`): "flex", a FlexAttention
BlockMask with each sample's prefix length (a fused kernel that skips the masked-out blocks), or "sdpa",
the dense (B, 1, I, I) boolean mask through SDPA, the reference. "auto" (the default) is flex on CUDA,
sdpa elsewhere: FlexAttention has no backward on CPU. The decoder is causal on SDPA's is_causal=True
(the flash kernel) either way.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from aimv2data.batch import normalize, normalize_patches, patchify

from .config import ModelConfig
from .mm_decoder import MultimodalDecoder
from .encoder import Encoder
from .layers import init_weights
from .masks import prefix_block_mask, prefix_causal_mask, resolve_attention, sample_prefix_lengths
from .objective import pixel_loss, pixel_targets, text_loss, text_targets
from .posemb import resize_learned


# The objective's named terms, in report order: the key in training_loss's parts and in metrics.jsonl
# -> (short name for tables and the progress bar, plot label). The total is always TOTAL_LOSS ("loss").
# Metrics, progress bar, plots, run summary (`<key>_end`), `aimv2 train`'s table and the model card
# all iterate over this: a new term is added here, in objective.py and in training_loss's weighting.
TOTAL_LOSS = "loss"
LOSS_TERMS = {"loss_img": ("image", "image (MSE)"), "loss_text": ("text", "text (CE)")}


class AIMv2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        enc, dec = cfg.encoder, cfg.decoder
        self.encoder = Encoder(enc)
        self.decoder = MultimodalDecoder(dec, enc.dim)
        self.pixel_head = nn.Linear(dec.dim, enc.patch_size ** 2 * enc.in_chans, bias=False)
        self.text_head = nn.Linear(dec.dim, dec.vocab_size, bias=False)
        init_weights(self.pixel_head)
        init_weights(self.text_head)
        self.attention = "auto"

    def set_attention(self, kind: str = "auto") -> None:
        """The encoder's prefix-mask kernel: "flex" (FlexAttention BlockMask), "sdpa" (dense mask, the
        reference) or "auto" (flex on CUDA, sdpa elsewhere). Same numbers either way (tests/test_model_attention.py)."""
        resolve_attention(kind, "cpu")  # validates the name
        self.attention = kind

    def prefix_mask(self, prefix_len: torch.Tensor, num_patches: int):
        """The encoder's training mask on the kernel `self.attention` picks for prefix_len's device."""
        if resolve_attention(self.attention, prefix_len.device) == "flex":
            return prefix_block_mask(prefix_len, num_patches)
        return prefix_causal_mask(prefix_len, num_patches)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute block activations in backward (trades ~1/3 more compute for activation memory)."""
        self.encoder.grad_checkpointing = enabled
        self.decoder.grad_checkpointing = enabled

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile each transformer block on its own (torchtitan's shape), not the whole model: blocks of
        one width share their graphs, so a run compiles a handful of graphs whatever its grids, and the patch
        embedding, norms, heads and losses stay eager. The forward is compiled, not the module: hooks (FSDP2's
        unshard, activation checkpointing) stay outside the graph and state-dict keys do not change."""
        for blk in [*self.encoder.blocks, *self.decoder.blocks]:
            blk.forward = torch.compile(blk.forward, **compile_kwargs)

    # -- the model's policies (asked by the optimiser, FSDP and --init; no key-name matching there) --

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters AdamW does not decay: each part's own set, prefixed, and every 1-D one."""
        return ({f"encoder.{n}" for n in self.encoder.no_weight_decay()}
                | {f"decoder.{n}" for n in self.decoder.no_weight_decay()}
                | {n for n, p in self.named_parameters() if p.ndim < 2})

    def fsdp_units(self) -> list[nn.Module]:
        """The transformer blocks, sharded one by one; the model itself is then the root unit."""
        return [*self.encoder.fsdp_units(), *self.decoder.fsdp_units()]

    def adapt_state_dict(self, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Weights of another AIMv2 (an earlier stage) made loadable here: a learned position table is
        resampled (bicubic) to this grid (high-res stage) or dropped for a sin-cos model (native stage).
        Returns the adapted copy and notes on what changed; ValueError when it cannot fit."""
        sd, own, notes = dict(sd), self.state_dict(), []
        key = "encoder.pos_embed"
        if key in sd:
            if key not in own:
                del sd[key]
                notes.append("learned position table dropped (sin-cos model)")
            elif sd[key].shape != own[key].shape:
                old_n = sd[key].shape[1]
                old, new = (math.isqrt(old_n),) * 2, self.cfg.encoder.grid
                if old[0] * old[1] != old_n:
                    raise ValueError(f"position table of {old_n} entries is not a square grid")
                sd[key] = resize_learned(sd[key], old, new)
                notes.append(f"position table resampled {old[0]}x{old[1]} -> {new[0]}x{new[1]} (bicubic)")
        for k in ("decoder.token_embed.weight", "text_head.weight"):
            if k in sd and sd[k].shape != own[k].shape:
                raise ValueError(f"its text vocabulary has {sd[k].shape[0]} ids, the tokenizer "
                                 f"{own[k].shape[0]}: train with the tokenizer of the run you start from")
        return sd, notes

    def forward(self, images: torch.Tensor, tokens: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, 3, H, W); tokens (B, T) or None; prefix_len (B,) or None (no mask).

        Returns pixel predictions (B, I-1, p*p*3) for patches 1..I-1 and text logits (B, T, V) for
        tokens 0..T-1 (None without tokens)."""
        p = self.cfg.encoder.patch_size
        I = (images.shape[2] // p) * (images.shape[3] // p)
        mask = None if prefix_len is None else self.prefix_mask(prefix_len.to(images.device), I)
        z = self.encoder(images, mask)
        h = self.decoder(z, None if tokens is None else tokens[:, :-1])
        pixels = self.pixel_head(h[:, : I - 1])
        logits = None if tokens is None else self.text_head(h[:, I - 1:])
        return pixels, logits

    def training_loss(self, images: torch.Tensor, patches: torch.Tensor | None, tokens: torch.Tensor | None,
                      pad_id: int, generator: torch.Generator | None = None,
                      prefix_len: torch.Tensor | None = None,
                      term_weights: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_text + alpha * L_img for one batch. `images`, `patches`: uint8 0..255 (a Batch's; normalised
        here) or float (normalised already). `patches` None: cut from `images`. `tokens` None: image
        loss only (loss_text reported as 0). `prefix_len` None: drawn M ~ U{1..I-1} from `generator`.
        `term_weights` (a micro-batch of gradient accumulation): each term scaled by this batch's share of the
        step's targets (`target_counts`), so the micro-batches' totals add up to the whole batch's loss; the
        parts stay this batch's own means."""
        p = self.cfg.encoder.patch_size
        B, C, H, W = images.shape
        I = (H // p) * (W // p)
        if images.dtype == torch.uint8:
            images = normalize(images)
        if patches is None:
            patches = patchify(images, p)
        elif patches.dtype == torch.uint8:
            patches = normalize_patches(patches)
        if patches.shape != (B, I, p * p * C):
            raise ValueError(f"patches {tuple(patches.shape)} do not match images {tuple(images.shape)}: "
                             f"expected {(B, I, p * p * C)} (Batch.patches, docs/contracts.md)")
        if tokens is not None and tokens.dtype != torch.long:
            raise TypeError(f"tokens must be int64 ids, got {tokens.dtype}")
        if prefix_len is None:
            prefix_len = sample_prefix_lengths(B, I, generator)
        prefix_len = prefix_len.to(images.device)
        pred, logits = self(images, tokens, prefix_len)
        loss_img = pixel_loss(pred, patches, prefix_len, self.cfg.norm_pix_eps)
        loss_text = text_loss(logits, tokens, pad_id) if tokens is not None else loss_img.new_zeros(())
        if term_weights is None:
            loss = loss_text + self.cfg.alpha * loss_img
        else:
            loss = term_weights["loss_text"] * loss_text + self.cfg.alpha * term_weights["loss_img"] * loss_img
        return loss, {"loss_img": loss_img.detach(), "loss_text": loss_text.detach(), "prefix_len": prefix_len}

    def target_counts(self, tokens: torch.Tensor | None, prefix_len: torch.Tensor, num_patches: int,
                      pad_id: int) -> dict[str, torch.Tensor]:
        """Per LOSS_TERMS name, how many targets its mean is over in a batch (0-d tensors: the image count on
        prefix_len's device, the text count on tokens'): the weights of micro-batches of one step."""
        text = text_targets(tokens, pad_id) if tokens is not None else torch.zeros((), dtype=torch.long, device=prefix_len.device)
        return {"loss_img": pixel_targets(prefix_len, num_patches), "loss_text": text}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
