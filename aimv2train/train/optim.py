"""Fully decoupled AdamW (the paper's optimiser, Table A1, after Loshchilov & Hutter [76]) and the
parameter groups it runs on.

PyTorch's AdamW shrinks weights by lr_t * wd per step, so changing the peak learning rate also changes
the regularisation. Here the decay follows the schedule's *shape* only (Loshchilov & Hutter's
eta_t schedule multiplier; apple/ml-l3m's AdamLH), one step t >= 1 with gradient g being

    m   <- b1 * m + (1 - b1) * g
    v   <- b2 * v + (1 - b2) * g^2
    p   <- p * (1 - (lr_t / lr_peak) * wd)                                      (decay, from p_{t-1})
    p   <- p - lr_t * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)           (Adam step)

so with wd = 1e-4 a weight shrinks by 1e-4 per step at the peak and by (lr_t / lr_peak) * 1e-4 during
warmup and decay, whatever lr_peak is. Norm weights, biases and position embeddings get wd = 0
(the model names them: AIMv2.no_weight_decay).
"""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, `decay` and `no_decay`, over the trainable parameters (names are kept for checks).
    The model says which names are not decayed (`model.no_weight_decay()`, timm's convention); a
    module without that method gets the common rule, 1-D parameters (norm scales, biases) only."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay, names = [], [], {"decay": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = "no_decay" if name in skip or p.ndim < 2 else "decay"
        (no_decay if group == "no_decay" else decay).append(p)
        names[group].append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay", "names": names["decay"]},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay", "names": names["no_decay"]},
    ]


class DecoupledAdamW(torch.optim.Optimizer):
    """AdamW whose weight decay is scaled by lr_t / lr_peak, not by lr_t (update in the module doc).

    Each group keeps `peak_lr` (its lr at construction); the trainer sets `group["lr"]` every step from
    the schedule. `foreach` uses torch's multi-tensor kernels (they also accept FSDP2's DTensors)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 1e-4, foreach: bool = True):
        if lr <= 0:
            raise ValueError(f"peak learning rate must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0 or eps < 0:
            raise ValueError(f"weight_decay and eps must be >= 0, got {weight_decay}, {eps}")
        defaults = dict(lr=lr, peak_lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        foreach=foreach)
        super().__init__(params, defaults)
        for g in self.param_groups:
            g.setdefault("peak_lr", g["lr"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, peak, wd, eps = group["lr"], group["peak_lr"], group["weight_decay"], group["eps"]
            b1, b2 = group["betas"]
            grads, m, v, steps = [], [], [], []
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("DecoupledAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                grads.append(p.grad)
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
                steps.append(int(state["step"].item()))
            if wd != 0:
                shrink = 1.0 - (lr / peak) * wd
                if group["foreach"]:
                    torch._foreach_mul_(params, shrink)
                else:
                    for p in params:
                        p.mul_(shrink)
            if group["foreach"] and len(set(steps)) == 1:
                t = steps[0]
                torch._foreach_lerp_(m, grads, 1 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, grads, grads, 1 - b2)
                denom = torch._foreach_sqrt(v)
                torch._foreach_div_(denom, (1 - b2 ** t) ** 0.5)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(params, m, denom, -lr / (1 - b1 ** t))
            else:
                for p, g, mi, vi, t in zip(params, grads, m, v, steps):
                    mi.lerp_(g, 1 - b1)
                    vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (vi.sqrt() / (1 - b2 ** t) ** 0.5).add_(eps)
                    p.addcdiv_(mi, denom, value=-lr / (1 - b1 ** t))
        return loss


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    eps: float = 1e-8) -> DecoupledAdamW:
    return DecoupledAdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                          weight_decay=weight_decay)
