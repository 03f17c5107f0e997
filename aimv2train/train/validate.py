"""Validation during training: `--val-manifest M --val-every N`.

The image loss (L_img, the pixel MSE on normalised patches, paper §2.1) and the text loss (L_text,
cross-entropy) on a held-out manifest, computed with no gradient and logged next to the training
losses as `val_loss`, `val_loss_img`, `val_loss_text` (and `val_<term>` for any other loss term the
model reports) in the same metrics.jsonl line as the step they follow.

Deterministic, so two evaluations differ only because the weights did:
- fixed crops, no augmentation: fixed resolution takes the centred square crop (RandomResizedCrop with
  scale = ratio = 1 falls back to exactly that), native resolution the centred cover crop; no flip;
- the loader is rewound to its initial state (`load_state_dict` of the `state_dict` taken at construction)
  each time: the same steps, shares, batches and captions chosen;
- the prefix lengths M come from a generator re-seeded with `seed` at each evaluation.
Every rank evaluates its slice of the same steps (as many as the rank with the shortest first loader
segment has: each rank reads its own share, and FSDP's all-gathers need every rank in every forward);
the losses are image-weighted means over ranks.
`aimv2 shard split` makes a held-out manifest (a hash of the key, so no sample is in both halves).
"""
from __future__ import annotations

import contextlib

import torch

from ..model.aimv2 import LOSS_TERMS, TOTAL_LOSS
from ..model.masks import sample_prefix_lengths
from .distributed import DistInfo, all_reduce_mean, decoder_device

VAL_SEED = 1234  # the validation crops, captions and prefix lengths; independent of --seed


def min_over_ranks(n: int, info: DistInfo, device: torch.device) -> int:
    """The smallest `n` over the ranks (n itself without a process group)."""
    if not info.enabled:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t.item())


class Validator:
    """`Validator(...)(model) -> {"val_loss": ..., "val_loss_img": ..., "val_loss_text": ..., "val_images": n}`."""

    def __init__(self, manifest: str, tokenizer, info: DistInfo, device: torch.device, *, native_res: bool,
                 resolution: int | None, batch_size: int, batch_patches: int, max_batches: int | None = None,
                 workers: int = 0, decoder: str = "pil", autocast=contextlib.nullcontext, seed: int = VAL_SEED):
        from aimv2data.loader import Loader
        from aimv2data.loader.samples import Manifest

        self.info, self.device, self.autocast, self.seed = info, device, autocast, seed
        self.pad_id = tokenizer.pad_id
        self.max_batches = max_batches
        kwargs = dict(tokenizer=tokenizer, pad_id=tokenizer.pad_id, rank=info.rank, world_size=info.world_size,
                      seed=seed, workers=workers, decoder=decoder, pin_memory=device.type == "cuda",
                      dali_device=decoder_device(device),  # this rank's GPU, not GPU 0
                      notices=False)  # the training loader has said what its mix does with the sources
        try:
            if native_res:
                self.loader = Loader(manifest, native_res=True, batch_patches=batch_patches, native_hflip=0.0,
                                     **kwargs)
            else:
                # a small held-out set still gives one batch: at most its share per rank (rows counted
                # from the parquet footers, not by reading the table)
                footers = Manifest(manifest)
                b = max(1, min(batch_size, footers.n // info.world_size))
                self.loader = Loader(footers, resolution=resolution, batch_size=b, scale=(1.0, 1.0),
                                     ratio=(1.0, 1.0), hflip=0.0, **kwargs)
        except ValueError as e:
            raise ValueError(f"--val-manifest {manifest}: {e}") from None
        self.patch_size = self.loader.patch_size
        self._start = self.loader.state_dict()  # rewound to before each evaluation: the same batches every time
        steps = len(self.loader) if max_batches is None else min(len(self.loader), max_batches)
        self.steps = min_over_ranks(steps, info, device)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        generator = torch.Generator().manual_seed(self.seed)
        self.loader.load_state_dict(self._start)  # the same batches every time
        sums: dict[str, float] = {}
        images = 0
        try:
            for i, batch in enumerate(self.loader):
                if i >= self.steps:
                    break
                batch = batch.to(self.device, non_blocking=True)
                B = len(batch)
                h, w = batch.grid
                prefix = sample_prefix_lengths(B, h * w, generator)
                with self.autocast():
                    loss, parts = model.training_loss(batch.images, batch.patches, batch.tokens, self.pad_id,
                                                      prefix_len=prefix)
                terms = {TOTAL_LOSS: loss, **{k: parts[k] for k in LOSS_TERMS}}
                values = torch.stack([v.detach().float() for v in terms.values()]).tolist()  # one host sync
                for k, v in zip(terms, values):
                    sums[k] = sums.get(k, 0.0) + v * B
                images += B
        finally:
            model.train(was_training)
        keys = sorted(sums)
        # image-weighted mean over ranks: mean(sum) / mean(count) == total sum / total count
        t = all_reduce_mean(torch.tensor([sums[k] for k in keys] + [float(images)], dtype=torch.float64,
                                         device=self.device), self.info).tolist()
        out = {f"val_{k}": t[i] / t[-1] for i, k in enumerate(keys)} if t[-1] else {}
        out["val_images"] = int(round(t[-1] * self.info.world_size))
        return out
