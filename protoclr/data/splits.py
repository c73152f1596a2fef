"""Which images a run reads: the data folder of the config, its train/held-out split, and each rank's share of an
evaluation pass. The trainer (training set, E-step pass, kNN monitor) and `python -m protoclr.eval` both use them,
so a checkpoint is evaluated on the split it was monitored on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import dist
from . import digits, fmnist
from .build import build_eval_loader
from .folder import ImageDataset, scan_image_folder, stratified_subset

__all__ = ["data_root", "load_splits", "sharded_eval_loader"]


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
        cfg.aug.eval_size_resolved,
        cfg.data.eval_batch_size,
        device,
        indices=indices,
        num_workers=cfg.data.num_workers,
        backend=cfg.data.backend,
        aug=cfg.aug,
    )
