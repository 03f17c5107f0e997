"""The `parity` part: the same weights and batch on CUDA and on CPU in fp32 (TF32 off): encoder tokens and both
losses, and on CUDA the gradients of the flex path against the SDPA path (CPU cannot run FlexAttention's
backward)."""
from __future__ import annotations

from dataclasses import replace

import torch

from .common import Sizes
from .steps import bench_run, synthetic_batches


def part_parity(device: torch.device, sizes: Sizes, **_) -> dict:
    """fp32 on both sides, TF32 off; same initial weights (one state dict), same batch and prefixes."""
    from aimv2data.batch import normalize

    from ..model.masks import sample_prefix_lengths

    tol = {"encoder_max_abs": 2e-3, "loss_rel": 1e-4, "grad_rel": 1e-4}
    old_tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        grid = (sizes.resolution // 14,) * 2
        cpu = torch.device("cpu")
        model = bench_run(replace(sizes, batch=sizes.parity_batch), cpu, False, "sdpa", False).model
        batch = synthetic_batches(sizes.parity_batch, grid, sizes, cpu, n=1)[0]
        images, tokens = batch.images, batch.tokens
        prefix = sample_prefix_lengths(images.shape[0], grid[0] * grid[1], torch.Generator().manual_seed(1))
        images = normalize(images)  # the encoder's own input (training_loss normalises a batch's uint8)
        ref = _forward_parts(model, images, tokens, prefix, "sdpa")
        model.to(device)
        out = {}
        for kind in ("sdpa", "flex"):  # FlexAttention's forward runs on CPU too (unfused)
            got = _forward_parts(model, images.to(device), tokens.to(device), prefix.to(device), kind)
            out[kind] = {"encoder_max_abs": (got["encoder"].cpu() - ref["encoder"]).abs().max().item(),
                         "loss_img_rel": abs(got["loss_img"] - ref["loss_img"]) / abs(ref["loss_img"]),
                         "loss_text_rel": abs(got["loss_text"] - ref["loss_text"]) / abs(ref["loss_text"])}
        if device.type == "cuda":  # what CPU cannot test: FlexAttention's backward against SDPA's
            grads = {}
            for kind in ("sdpa", "flex"):
                model.zero_grad(set_to_none=True)
                model.set_attention(kind)
                loss, _ = model.training_loss(images.to(device), None, tokens.to(device), 0,
                                              prefix_len=prefix.to(device))
                loss.backward()
                grads[kind] = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
            diff = (grads["flex"] - grads["sdpa"]).norm() / grads["sdpa"].norm()
            out["flex_vs_sdpa_encoder_grad_rel"] = diff.item()
        ok = all(v["encoder_max_abs"] <= tol["encoder_max_abs"] and v["loss_img_rel"] <= tol["loss_rel"]
                 and v["loss_text_rel"] <= tol["loss_rel"] for k, v in out.items() if isinstance(v, dict))
        ok = ok and out.get("flex_vs_sdpa_encoder_grad_rel", 0.0) <= tol["grad_rel"]
        return {"tolerance": tol, "within_tolerance": ok, "cpu_vs_device": out, "batch": sizes.parity_batch,
                "grid": list(grid)}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old_tf32


def _forward_parts(model, images, tokens, prefix, kind: str) -> dict:
    model.set_attention(kind)
    with torch.no_grad():
        p = model.cfg.encoder.patch_size
        enc = model.encoder(images, model.prefix_mask(prefix, (images.shape[2] // p) * (images.shape[3] // p)))
        _, parts = model.training_loss(images, None, tokens, 0, prefix_len=prefix)
    return {"encoder": enc.float().cpu(), "loss_img": parts["loss_img"].item(), "loss_text": parts["loss_text"].item()}
