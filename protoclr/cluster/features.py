"""Index-aligned features for the E-step (SPEC §1): `extract_features`, a pass of the encoder over the dataset
with row i = dataset index i, sharded over ranks under a process group."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .. import dist
from .common import check_int, fail, progress_iter, use_distributed

log = logging.getLogger(__name__)


def _unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        if "images" not in batch or "index" not in batch:
            fail("extract_features", f"a dict batch must hold 'images' and 'index', got keys {sorted(batch)}")
        return batch["images"], batch["index"]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        fail(
            "extract_features",
            "loader must yield (images, labels, index) with index the dataset indices, "
            f"got {type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}",
        )
    return batch[0], batch[-1]


def _check_index(index, n_rows: int, num_images: int) -> torch.Tensor:
    fn = "extract_features"
    if not isinstance(index, torch.Tensor):
        fail(fn, f"index (the loader's last item) must be an int64 tensor of dataset indices, got {type(index)}")
    if index.dtype not in (torch.int64, torch.int32) or index.shape != (n_rows,):
        fail(
            fn,
            f"index must be int64 of shape (B,)=({n_rows},) like the images, got {index.dtype} {tuple(index.shape)}; "
            "make the dataset return its index as the last item",
        )
    if n_rows:
        lo, hi = int(index.min()), int(index.max())  # loaders yield CPU indices: no device sync
        if lo < 0 or hi >= num_images:
            fail(fn, f"index must lie in [0, num_images={num_images}), got values in [{lo}, {hi}]")
    return index.to(torch.int64)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable,
    num_images: int,
    device: torch.device | str | None = None,
    *,
    amp: bool | None = None,
    progress: bool = True,
    distributed: bool | None = None,
) -> torch.Tensor:
    """Pooled features of every image, row i = dataset index i (SPEC §1 E-step).

    The encoder runs in eval mode (restored afterwards) under `torch.no_grad`, in bf16 autocast on CUDA. Rows
    are written by the index the loader yields, never by loader order, so any sampler (shuffled, sharded,
    padded) gives the same matrix; an index seen several times (a padded DistributedSampler) is averaged.
    Under a process group every rank encodes what its loader yields (its shard) and the rows are summed over
    ranks, so every rank returns the same matrix. Pass the unwrapped module: a DDP wrapper is unwrapped here,
    because its forward synchronises buffers and would deadlock when ranks see different batch counts.

    Args:
        encoder: module mapping images (B, 3, H, W) to pooled features h (B, Dh).
        loader: iterable of (images, labels, index) (any tuple whose first item is the images and last the
            (B,) int64 dataset indices) or dicts with "images" and "index". Should use the eval transform.
        num_images: number of images N in the dataset; every index in [0, N) must be produced by some rank.
        device: where the encoder runs and the result lives; default: the encoder's parameters' device.
        amp: bf16 autocast; None = on for CUDA, off elsewhere.
        progress: tqdm bar on rank 0.
        distributed: None = when a process group is initialised; False = this process only.

    Returns:
        (N, Dh) float32 on `device`, identical on every rank.

    Raises:
        ValueError: bad loader items or indices, an encoder output that is not (B, Dh), ranks that disagree on
            Dh, or indices that no rank produced (names how many and the first few).
    """
    fn = "extract_features"
    check_int(fn, "num_images", num_images, 1)
    on = use_distributed(fn, distributed)
    module = encoder.module if isinstance(encoder, nn.parallel.DistributedDataParallel) else encoder
    if device is None:
        param = next(module.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    use_amp = device.type == "cuda" if amp is None else bool(amp)

    feats: torch.Tensor | None = None  # (N, Dh), allocated once Dh is known
    counts = torch.zeros(num_images, dtype=torch.int64, device=device)
    was_training = module.training
    module.eval()
    t0 = time.perf_counter()
    try:
        bar = progress_iter(loader, "features", progress)
        for batch in bar:
            images, index = _unpack_batch(batch)
            if not isinstance(images, torch.Tensor):
                fail(fn, f"images (the loader's first item) must be a tensor, got {type(images).__name__}")
            index = _check_index(index, images.size(0), num_images).to(device, non_blocking=True)
            images = images.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                h = module(images)
            if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.size(0) != images.size(0):
                got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                fail(fn, f"encoder must map images ({images.size(0)}, ...) to pooled features (B, Dh), got {got}")
            if feats is None:
                feats = torch.zeros(num_images, h.size(1), dtype=torch.float32, device=device)
            elif h.size(1) != feats.size(1):
                fail(fn, f"encoder output width changed from {feats.size(1)} to {h.size(1)} between batches")
            # index_add_, not index_put_: duplicate indices (padded samplers) accumulate and are averaged below.
            feats.index_add_(0, index, h.float())
            counts.index_add_(0, index, torch.ones_like(index))
    finally:
        module.train(was_training)

    if on:
        # Ranks whose loader was empty do not know Dh: agree on it before the all-reduce.
        width = torch.tensor([feats.size(1) if feats is not None else 0, int(feats is not None)], device=device)
        total, ranks = dist.all_reduce_sum(width).tolist()
        if ranks == 0:
            fail(fn, "loader yielded no batch on any rank")
        if total != (total // ranks) * ranks or (feats is not None and feats.size(1) != total // ranks):
            fail(fn, "encoder output width Dh differs between ranks")
        if feats is None:
            feats = torch.zeros(num_images, total // ranks, dtype=torch.float32, device=device)
        # Rows are disjoint across ranks (or duplicates averaged): summing restores the full index-ordered matrix.
        feats = dist.all_reduce_sum(feats)
        counts = dist.all_reduce_sum(counts)
    if feats is None:
        fail(fn, "loader yielded no batch")
    missing = (counts == 0).nonzero().flatten()
    if missing.numel():
        fail(
            fn,
            f"{missing.numel()} of num_images={num_images} indices were never produced by the loader "
            f"(first: {missing[:8].tolist()}); use a sampler that covers the dataset (drop_last=False)",
        )
    if int(counts.max()) > 1:
        feats /= counts[:, None].to(feats.dtype)
    log.info("extract_features: %d images x %d dims in %.1fs", num_images, feats.size(1), time.perf_counter() - t0)
    return feats
