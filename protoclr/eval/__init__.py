"""Evaluation of frozen encoders: weighted kNN (the training monitor) and a linear probe (SPEC §2, §3.1).

`python -m protoclr.eval knn|linear --ckpt PATH --data DIR` runs them from the command line (see __main__.py).
This module holds what the trainer shares with that CLI: feature extraction in dataset-index order
(`protoclr.cluster.extract_features`, sharded over ranks under DDP) and the kNN monitor; the train/held-out split
is `protoclr.data.load_splits`. Unreadable images are dropped from evaluation (the loader gives them as blank
images, which would still vote in kNN).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .. import cluster, dist
from ..data import ImageDataset, sharded_eval_loader
from .knn import knn_classify
from .linear import linear_probe

__all__ = ["extract", "knn_eval", "knn_baselines", "knn_classify", "linear_probe"]

log = logging.getLogger(__name__)


def extract(
    encoder: nn.Module, ds: ImageDataset, cfg, device: torch.device, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Features and labels of the readable images of `ds` with the eval transform, in dataset-index order.

    Under a process group each rank encodes a strided shard and every rank gets the same result.

    Returns:
        (M, C) float32 features, (M,) int64 labels, and the number of unreadable images dropped (M = len(ds) - it).
    """
    loader = sharded_eval_loader(ds, cfg, device)
    feats = cluster.extract_features(encoder, loader, len(ds), device, progress=progress)
    labels = torch.tensor(ds.targets, dtype=torch.int64, device=device)
    bad = _unreadable(ds, loader.skipped_paths)
    if bad:
        keep = torch.ones(len(ds), dtype=torch.bool, device=device)
        keep[bad] = False
        feats, labels = feats[keep], labels[keep]
        log.warning("evaluation: dropped %d unreadable image(s) of %s", len(bad), ds.root)
    return feats, labels, len(bad)


def _unreadable(ds: ImageDataset, paths: list[str]) -> list[int]:
    """Dataset indices of the unreadable `paths` that any rank's loader reported."""
    if dist.get_world_size() > 1:
        paths = [p for rank_paths in dist.all_gather_object(paths) for p in rank_paths]
    bad = set(paths)
    return [i for i, (p, _) in enumerate(ds.samples) if p in bad] if bad else []


def knn_eval(
    encoder: nn.Module, train: ImageDataset, val: ImageDataset, cfg, device: torch.device, progress: bool = False
) -> dict[str, float]:
    """Weighted kNN (cfg.eval.knn_k, knn_t) of `val` against `train` features; identical on every rank.
    Unreadable images are left out of both sets; "unreadable_train" / "unreadable_val" count them."""
    bank, y_bank, bad_train = extract(encoder, train, cfg, device, progress)
    queries, y_queries, bad_val = extract(encoder, val, cfg, device, progress)
    res = knn_classify(
        bank, y_bank, queries, y_queries, k=cfg.eval.knn_k, t=cfg.eval.knn_t, num_classes=len(train.classes)
    )
    return {**res, "unreadable_train": bad_train, "unreadable_val": bad_val}


def knn_baselines(cfg, train: ImageDataset, val: ImageDataset, device: torch.device) -> dict[str, float]:
    """kNN top-1 of the no-learning references on the same split: raw pixels (the flattened eval images) and the
    config's backbone at its seeded random initialisation (the global RNG is left untouched)."""
    from ..model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        backbone = build_model(cfg).backbone.to(device)
    return {
        "pixels": knn_eval(nn.Flatten(), train, val, cfg, device)["top1"],
        "random_init": knn_eval(backbone, train, val, cfg, device)["top1"],
    }
