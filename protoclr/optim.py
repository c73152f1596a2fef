"""Optimisation (SPEC §2): LARS with BatchNorm/bias parameters exempt, parameter groups, warm-up + cosine.

The learning rate is a pure function of the global step (`WarmupCosine.lr_at`), so a resumed run needs only the
step to continue the schedule exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["LARS", "WarmupCosine", "build_optimizer", "param_groups", "scaled_lr"]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of SPEC §2: lr = base_lr × global batch / 256."""
    return base_lr * global_batch / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and BatchNorm parameters + biases (every parameter with
    ndim <= 1: no weight decay, no LARS adaptation), as in SimCLR/DINO."""
    regular, exempt = [], []
    for p in model.parameters():
        if p.requires_grad:
            (exempt if p.ndim <= 1 else regular).append(p)
    return [
        {"params": regular, "weight_decay": weight_decay, "lars_exclude": False, "name": "weights"},
        {"params": exempt, "weight_decay": 0.0, "lars_exclude": True, "name": "bn_bias"},
    ]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017), the SimCLR/DINO variant.

    For each parameter p with gradient g of a group without `lars_exclude`:
        d = g + wd·p;  q = eta·|p| / |d| if |p| > 0 and |d| > 0 else 1;  d ← q·d
    then for every parameter: buf ← momentum·buf + d;  p ← p - lr·buf.
    Groups with `lars_exclude=True` (BN, biases) skip the adaptation (and take weight_decay=0 from
    `param_groups`). Uses the `torch._foreach_*` ops: a handful of kernel launches per group, not per tensor.

    Args:
        params: parameters or groups. lr: learning rate. weight_decay: L2 coefficient. momentum: heavy-ball
        momentum. eta: trust coefficient.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, eta: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta < 0:
            raise ValueError(f"LARS: invalid lr={lr}, weight_decay={weight_decay}, momentum={momentum} or eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta, lars_exclude=False))

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
            grads = [p.grad for p in params]
            wd = group["weight_decay"]
            d = torch._foreach_add(grads, params, alpha=wd) if wd else [g.clone() for g in grads]
            if not group["lars_exclude"]:
                p_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(d))
                ok = (p_norm > 0) & (d_norm > 0)
                q = torch.where(
                    ok,
                    group["eta"] * p_norm / d_norm.clamp(min=torch.finfo(d_norm.dtype).tiny),
                    torch.ones_like(p_norm),
                )
                torch._foreach_mul_(d, list(q.unbind()))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def build_optimizer(cfg_optim, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """LARS or momentum SGD over `param_groups(model)`."""
    groups = param_groups(model, cfg_optim.weight_decay)
    if cfg_optim.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg_optim.momentum, eta=cfg_optim.eta)
    if cfg_optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg_optim.momentum)
    raise ValueError(f"build_optimizer: optim.name must be 'lars' or 'sgd', got {cfg_optim.name!r}")


class WarmupCosine:
    """Linear warm-up from base_lr/warmup_steps to base_lr over `warmup_steps`, then cosine decay to `final_lr` at
    `total_steps` (held after). Sets every group's lr; `step()` advances one optimisation step.

    Args:
        optimizer: whose groups get the lr. base_lr: peak lr (already batch-scaled). final_lr: lr at the end.
        total_steps: schedule length in steps. warmup_steps: warm-up length in steps.
    """

    def __init__(self, optimizer, base_lr: float, final_lr: float, total_steps: int, warmup_steps: int) -> None:
        self.optimizer = optimizer
        self.base_lr, self.final_lr = float(base_lr), float(final_lr)
        self.total_steps, self.warmup_steps = max(int(total_steps), 1), max(int(warmup_steps), 0)
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (1 + math.cos(math.pi * progress))

    def get_last_lr(self) -> float:
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {
            "last_step": self.last_step,
            "base_lr": self.base_lr,
            "final_lr": self.final_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()
