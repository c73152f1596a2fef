"""Linear probe on frozen features (SPEC §2: 100 epochs, SGD Nesterov, lr 0.1 × batch/256, cosine).

The encoder is frozen, so its features are computed once (eval transform) and the probe trains on them: the same
optimisation problem as SimCLR's linear evaluation without augmentation, at a tiny fraction of the cost. Features
are standardised with the training set's mean and std first (a BatchNorm without affine parameters, as MoCo v3's
probe), so one learning rate fits every encoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["linear_probe"]


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train a linear classifier on frozen features and report test accuracy.

    Args:
        train_feats: (Ntr, D) float features; train_labels: (Ntr,) int64.
        test_feats: (Nte, D); test_labels: (Nte,) int64.
        num_classes: C; default max label + 1.
        epochs: passes over the training features. lr: per 256 samples (scaled by batch_size/256).
        batch_size: mini-batch size. weight_decay: L2 on the weights. seed: init and shuffling.

    Returns:
        {"top1": % on the test set, "top5": % (C >= 5), "train_top1": % on the training set, "epochs", "lr"}.
    """
    if train_feats.size(1) != test_feats.size(1):
        raise ValueError(f"linear_probe: feature dims differ: {train_feats.size(1)} vs {test_feats.size(1)}")
    device = train_feats.device
    g = torch.Generator().manual_seed(seed)
    x = train_feats.float()
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp(min=1e-6)
    x = (x - mean) / std
    xt = (test_feats.float().to(device) - mean) / std
    y, yt = train_labels.to(device), test_labels.to(device)
    c = int(num_classes or int(max(y.max(), yt.max())) + 1)
    head = nn.Linear(x.size(1), c).to(device)
    with torch.no_grad():
        w = torch.empty(c, x.size(1)).normal_(0, 0.01, generator=g)
        head.weight.copy_(w)
        head.bias.zero_()
    base = lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=base, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    steps_per_epoch = max(math.ceil(x.size(0) / batch_size), 1)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(x.size(0), generator=g).to(device)
        for s in range(0, x.size(0), batch_size):
            for group in opt.param_groups:
                group["lr"] = 0.5 * base * (1 + math.cos(math.pi * step / total))
            idx = perm[s : s + batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        logits = head(xt)
        top = logits.topk(min(5, c), dim=1).indices
        out = {
            "top1": 100.0 * float((top[:, 0] == yt).float().mean()),
            "train_top1": 100.0 * float((head(x).argmax(1) == y).float().mean()),
            "epochs": epochs,
            "lr": base,
            "n_train": x.size(0),
            "n_test": xt.size(0),
        }
        if c >= 5:
            out["top5"] = 100.0 * float((top == yt[:, None]).any(1).float().mean())
    return out
