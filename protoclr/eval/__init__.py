"""Evaluation of frozen encoders: weighted kNN (the training monitor) and a linear probe (SPEC §2, §3.1).

`python -m protoclr.eval knn|linear --ckpt PATH --data DIR` runs them from the command line (see __main__.py).
This module holds what the trainer shares with that CLI: the train/held-out split of a data folder and feature
extraction in dataset-index order (`protoclr.cluster.extract_features`, sharded over ranks under DDP). Unreadable
images are dropped from evaluation (the loader gives them as blank images, which would still vote in kNN).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import cluster, dist
from ..data import ImageDataset, build_eval_loader, digits, fmnist, scan_image_folder, stratified_subset
from .knn import knn_classify
from .linear import linear_probe

__all__ = ["load_splits", "extract", "knn_eval", "knn_baselines", "knn_classify", "linear_probe", "data_root"]

log = logging.getLogger(__name__)


def data_root(data_cfg) -> Path:
    """The data folder of the config's data section: `data.root`, or the export of the built-in source
    (data.dataset 'digits' or 'fmnist'; 'auto' with root '' = digits), which rank 0 writes while the others wait."""
    name = data_cfg.dataset
    if name == "auto":
        if data_cfg.root:
            return Path(data_cfg.root).expanduser()
        name = "digits"

    def export() -> Path:
        if name == "digits":
            return digits.export_digits()
        return fmnist.export_fmnist(data_cfg.fmnist_src or None, download=data_cfg.download)

    if dist.is_main_process():
        path = export()
    dist.barrier()
    if not dist.is_main_process():
        path = export()  # finds the finished export
    return path


def load_splits(data_cfg, seed: int = 0) -> tuple[ImageDataset, ImageDataset | None, str]:
    """(train, held-out or None, description) for the config's data section.

    - root holding train/ (a built-in source too): train on root/train; hold out data.val, else root/val, else
      root/test.
    - otherwise: train on root; hold out data.val, else a random share data.holdout of root (removed from the
      training set, fixed by the seed), else none.
    - data.subset > 0: then train on a class-stratified subset of that many training images (`stratified_subset`,
      fixed by the seed); the held-out set is unaffected.
    The held-out set must have the training set's classes (labels are compared by class name).
    """
    train, val, desc = _splits(data_cfg, seed)
    if data_cfg.subset:
        full = len(train)
        train = stratified_subset(train, data_cfg.subset, seed)
        desc += f"; training on a stratified subset of {len(train)} of the {full} training images (data.subset)"
    return train, val, desc


def _splits(data_cfg, seed: int) -> tuple[ImageDataset, ImageDataset | None, str]:
    root = data_root(data_cfg)
    val_path = Path(data_cfg.val).expanduser() if data_cfg.val else None
    if root.is_dir() and (root / "train").is_dir():
        train = scan_image_folder(root / "train")
        if val_path is None:
            val_path = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    else:
        train = scan_image_folder(root)
    if val_path is not None:
        val = scan_image_folder(val_path)
        if val.classes != train.classes:
            raise ValueError(
                f"held-out folder {str(val_path)!r} has classes {val.classes[:5]}... but the training folder "
                f"{str(train.root)!r} has {train.classes[:5]}...; they must match for kNN/linear evaluation"
            )
        return train, val, f"train {train.root} ({len(train)} images), held out {val.root} ({len(val)} images)"
    if data_cfg.holdout > 0:
        rng = np.random.default_rng([seed, 0x4E1D])
        perm = rng.permutation(len(train))
        n_val = max(1, int(round(data_cfg.holdout * len(train))))
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val = ImageDataset(train.root, [train.samples[i] for i in val_idx], list(train.classes))
        train = ImageDataset(train.root, [train.samples[i] for i in train_idx], list(train.classes))
        return (
            train,
            val,
            (f"{train.root}: {len(train)} training images, {len(val)} held out (data.holdout={data_cfg.holdout})"),
        )
    return train, None, f"train {train.root} ({len(train)} images), no held-out set (kNN monitor off)"


def sharded_eval_loader(ds: ImageDataset, cfg, device: torch.device):
    """Eval-transform loader over `ds` (resize, centre crop, normalise with the training statistics); under a
    process group each rank reads a strided shard, which `cluster.extract_features` gathers back by index."""
    world, rank = dist.get_world_size(), dist.get_rank()
    indices = list(range(rank, len(ds), world)) if world > 1 else None
    return build_eval_loader(
        ds,
        cfg.aug.image_size,
        cfg.data.eval_batch_size,
        device,
        indices=indices,
        num_workers=cfg.data.num_workers,
        backend=cfg.data.backend,
        aug=cfg.aug,
    )


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
