"""Data pipeline (knows no model): datasets on disk, the SPEC §2 augmentations on DALI or torchvision v2, and the
PrototypePairSampler of SPEC §1.5.

    ds = scan_image_folder(root)                      # or digits.export_digits() / "train", fmnist.export_fmnist()
    sampler = PrototypePairSampler(len(ds), batch_size=B, seed=0)
    loader = build_train_loader(ds, sampler, AugmentConfig(), device)
    for epoch in range(E):
        sampler.set_epoch(epoch); sampler.set_prototypes(ids_or_None)
        for views, index in loader: ...               # views: V × (B, 3, H, W) channels_last; index: (B,) int64
"""

from . import digits, fmnist
from .augment import AugmentConfig
from .build import build_eval_loader, build_train_loader, resolve_backend
from .folder import ImageDataset, read_file_list, scan_image_folder, stratified_subset
from .sampler import PrototypePairSampler, paper_pairs
from .splits import data_root, load_splits, sharded_eval_loader

__all__ = [
    "AugmentConfig",
    "ImageDataset",
    "PrototypePairSampler",
    "paper_pairs",
    "build_eval_loader",
    "build_train_loader",
    "data_root",
    "digits",
    "fmnist",
    "load_splits",
    "read_file_list",
    "resolve_backend",
    "scan_image_folder",
    "sharded_eval_loader",
    "stratified_subset",
]
