"""Prototypes for SPCL's E-step (SPEC §1, §3.1): index-aligned features, PCA whitening, k-means.

Once per epoch the trainer calls `cluster_dataset`, which chains:

1. `extract_features`: pooled backbone features of every image with the eval transform, written to row
   i = dataset index i (never loader order: the public reference code misaligns labels exactly there).
2. `pca_whiten`: PCA fitted on those features, projected to 256 dims, eigenvalues raised to -0.5, rows
   L2-normalised.
3. `kmeans`: Lloyd iterations whose E-step is `protoclr.ops.assign` with bias -½|c|² (the only place
   argmax-to-centroid logic lives; on the CPU the M-step's sums are taken in the same pass), empty clusters
   re-seeded by splitting the largest one (as faiss does).
4. `Prototypes.update`: one prototype id per image, kept for the M-step and saved in checkpoints.

`cluster_bank` is the same chain on a `FeatureBank` (cluster.features=bank): the features the training forward
computed during the epoch, index-aligned the same way, instead of step 1's second pass over the data.

Distributed (SPEC §4), when a process group is initialised: each rank encodes its shard of the dataset and
the features are summed back into index order, so every rank holds the same (num_images, D) matrix; k-means
then gives each rank a contiguous block of rows (or takes pre-sharded rows, `sharded=True`) and all-reduces
centroid sums, counts and inertia, so every rank ends with the same centroids and assignments — the same as
one process with the same seed (up to float rounding of the sums, which are accumulated in float64).

Modules: features.py (step 1), bank.py (`FeatureBank`), pca.py (step 2), lloyd.py (step 3, `kmeans`), prototypes.py
(step 4, `cluster_stats`), common.py (checks and progress bars they share); the chain itself is here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from .bank import FeatureBank
from .common import fail
from .features import extract_features
from .lloyd import _SPLIT_EPS as _SPLIT_EPS  # noqa: F401  (tests)
from .lloyd import _m_stats as _m_stats  # noqa: F401  (tests)
from .lloyd import _split_empty as _split_empty  # noqa: F401  (tests)
from .lloyd import kmeans
from .pca import _pca_fit as _pca_fit  # noqa: F401  (tests)
from .pca import pca_whiten
from .prototypes import Prototypes, cluster_stats

__all__ = [
    "FeatureBank",
    "Prototypes",
    "cluster_bank",
    "cluster_dataset",
    "cluster_stats",
    "extract_features",
    "kmeans",
    "pca_whiten",
]

log = logging.getLogger(__name__)


def cluster_dataset(
    encoder: nn.Module,
    loader: Iterable,
    num_images: int,
    *,
    k: int,
    pca_dim: int = 256,
    power: float = -0.5,
    iters: int = 20,
    seed: int = 0,
    device: torch.device | str | None = None,
    epoch: int = -1,
    prototypes: Prototypes | None = None,
    backend: str = "auto",
    progress: bool = True,
    amp: bool | None = None,
) -> Prototypes:
    """The SPEC §1 E-step: extract_features -> pca_whiten -> kmeans -> Prototypes.update, logged.

    Args:
        encoder, loader, num_images, device, amp: see `extract_features` (loader with the eval transform).
        k: number of prototypes K; pca_dim, power: see `pca_whiten`; iters, seed, backend: see `kmeans`.
        epoch: recorded in the prototypes (the epoch about to use them).
        prototypes: updated in place; None creates `Prototypes(num_images)` on `device`.
        progress: tqdm bars on rank 0.

    Returns:
        The updated prototypes: ids (num_images,) int64 on `device`, identical on every rank.
    """
    t0 = time.perf_counter()
    feats = extract_features(encoder, loader, num_images, device, amp=amp, progress=progress)
    return _cluster(
        feats, None, "features", time.perf_counter() - t0, k=k, pca_dim=pca_dim, power=power, iters=iters, seed=seed,
        epoch=epoch, prototypes=prototypes, backend=backend, progress=progress,
    )  # fmt: skip


def cluster_bank(
    bank: FeatureBank,
    *,
    k: int,
    pca_dim: int = 256,
    power: float = -0.5,
    iters: int = 20,
    seed: int = 0,
    epoch: int = -1,
    prototypes: Prototypes | None = None,
    backend: str = "auto",
    progress: bool = True,
) -> Prototypes:
    """The E-step on the features a `FeatureBank` collected (a collective under a process group): `gather` ->
    pca_whiten -> kmeans -> Prototypes.update, fitted on the images present in the bank only. Absent images
    (never met in the collected epoch) get id -1: no prototype for the next epoch (the sampler puts them in
    cross pairs, the loss treats them as unclustered). Arguments as `cluster_dataset`; the bank is consumed."""
    t0 = time.perf_counter()
    feats, present = bank.gather()
    return _cluster(
        feats, present, "bank", time.perf_counter() - t0, k=k, pca_dim=pca_dim, power=power, iters=iters, seed=seed,
        epoch=epoch, prototypes=prototypes, backend=backend, progress=progress,
    )  # fmt: skip


def _cluster(
    feats: torch.Tensor,
    present: torch.Tensor | None,
    source: str,
    t_feats: float,
    *,
    k: int,
    pca_dim: int,
    power: float,
    iters: int,
    seed: int,
    epoch: int,
    prototypes: Prototypes | None,
    backend: str,
    progress: bool,
) -> Prototypes:
    """pca_whiten -> kmeans -> Prototypes.update on the rows of feats (N, D) where `present` (None = all)."""
    t1 = time.perf_counter()
    num_images = feats.size(0)
    n_absent = 0 if present is None else num_images - int(present.sum())
    x = feats if not n_absent else feats[present]
    white = pca_whiten(x, dim=pca_dim, power=power)
    del feats, x
    centroids, assignments, inertia = kmeans(white, k, iters=iters, seed=seed, backend=backend, progress=progress)
    t2 = time.perf_counter()
    if n_absent:
        ids = torch.full((num_images,), -1, dtype=torch.int64, device=assignments.device)
        ids[present.to(ids.device)] = assignments
        assignments = ids
    if prototypes is None:
        prototypes = Prototypes(num_images, device=assignments.device)
    elif prototypes.num_images != num_images:
        fail("cluster_dataset", f"prototypes hold {prototypes.num_images} images but num_images={num_images}")
    prototypes.update(assignments, centroids, epoch, inertia)
    s = prototypes.stats
    log.info(
        "epoch %d prototypes: k=%d inertia %.6g (%.4f per image) | sizes min %d max %d mean %.1f, %d empty | "
        "%s %.1fs, whiten+k-means %.1fs%s",
        epoch,
        k,
        inertia,
        inertia / (num_images - n_absent),
        s["size_min"],
        s["size_max"],
        s["size_mean"],
        s["empty"],
        source,
        t_feats,
        t2 - t1,
        f" | {n_absent} images absent from the bank (id -1)" if n_absent else "",
    )
    return prototypes
