"""`Prototypes`: one prototype id per image and the centroids that produced them, kept for the M-step and saved
in checkpoints; `cluster_stats`, the cluster-size statistics logged with them."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..ops import checks
from .common import check_int, fail


def cluster_stats(assignments: torch.Tensor, k: int) -> dict[str, float]:
    """Cluster-size statistics of (N,) int64 assignments in [-1, k): size_min/size_max/size_mean and `empty`
    (clusters with no row); ids -1 are ignored."""
    a = assignments[assignments >= 0]
    sizes = torch.bincount(a, minlength=k)
    return {
        "k": int(k),
        "size_min": int(sizes.min()),
        "size_max": int(sizes.max()),
        "size_mean": float(a.numel() / k),
        "empty": int((sizes == 0).sum()),
    }


class Prototypes:
    """Per-image prototype ids and the centroids that produced them; saved in checkpoints.

    Attributes:
        ids: (num_images,) int64 prototype id of each dataset index, -1 before the first clustering.
        centroids: (K, D) float centroids in the whitened feature space, or None before the first clustering.
        epoch: epoch whose E-step computed them, -1 before the first clustering.
        inertia: k-means inertia of that clustering, or None.
        stats: cluster-size statistics of the last update (`cluster_stats`), not checkpointed.
    """

    _KEYS = ("ids", "centroids", "epoch", "inertia")

    def __init__(self, num_images: int, device: torch.device | str | None = None) -> None:
        check_int("Prototypes", "num_images", num_images, 1)
        self.ids = torch.full((num_images,), -1, dtype=torch.int64, device=device)
        self.centroids: torch.Tensor | None = None
        self.epoch = -1
        self.inertia: float | None = None
        self.stats: dict[str, float] = {}

    @property
    def num_images(self) -> int:
        return self.ids.numel()

    @property
    def k(self) -> int:
        """Number of prototypes, 0 before the first clustering."""
        return 0 if self.centroids is None else self.centroids.size(0)

    def __repr__(self) -> str:
        return f"Prototypes(num_images={self.num_images}, k={self.k}, epoch={self.epoch})"

    def _check(self, fn: str, ids, centroids) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.shape != (self.num_images,):
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            fail(fn, f"ids must be int64 of shape (num_images,)=({self.num_images},), got {got}")
        if centroids is not None:
            checks.check_features(fn, "centroids", centroids)
        k = centroids.size(0) if centroids is not None else 0
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= k:
                fail(fn, f"ids must lie in [-1, K={k}) (K = rows of centroids), got values in [{lo}, {hi}]")

    def update(self, ids: torch.Tensor, centroids: torch.Tensor, epoch: int, inertia: float | None = None) -> None:
        """Store a clustering: ids (num_images,) int64 in [0, K) (kept on their device), centroids (K, D)."""
        fn = "Prototypes.update"
        self._check(fn, ids, centroids)
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            fail(fn, f"epoch must be an int, got {epoch!r}")
        self.ids = ids.detach()
        self.centroids = centroids.detach()
        self.epoch = epoch
        self.inertia = None if inertia is None else float(inertia)
        self.stats = cluster_stats(self.ids, self.k)

    def to(self, device: torch.device | str) -> Prototypes:
        self.ids = self.ids.to(device)
        if self.centroids is not None:
            self.centroids = self.centroids.to(device)
        return self

    def state_dict(self) -> dict:
        """CPU tensors and plain numbers, for `torch.save` inside a checkpoint."""
        return {
            "ids": self.ids.cpu(),
            "centroids": None if self.centroids is None else self.centroids.cpu(),
            "epoch": self.epoch,
            "inertia": self.inertia,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Strict restore onto the current device of `ids`.

        Raises:
            ValueError: missing or unexpected keys, or ids of another num_images / out of range.
        """
        fn = "Prototypes.load_state_dict"
        if not isinstance(state, Mapping) or set(state) != set(self._KEYS):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            fail(fn, f"state must hold exactly the keys {sorted(self._KEYS)}, got {got}")
        ids, centroids = state["ids"], state["centroids"]
        if isinstance(ids, torch.Tensor) and ids.shape != (self.num_images,):
            fail(fn, f"ids has {ids.numel()} entries but num_images={self.num_images}: the dataset changed size")
        self._check(fn, ids, centroids)
        device = self.ids.device
        self.ids = ids.to(device)
        self.centroids = None if centroids is None else centroids.to(device)
        self.epoch = int(state["epoch"])
        self.inertia = None if state["inertia"] is None else float(state["inertia"])
        self.stats = cluster_stats(self.ids, self.k) if self.centroids is not None else {}
