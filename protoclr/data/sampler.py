"""`PrototypePairSampler`: batches of image pairs, half same-prototype, half cross-prototype (SPEC §1.5).

An epoch's plan is computed identically on every rank from (seed, epoch, prototype ids), then cut into global
batches of `batch_size · num_replicas` images; rank r takes the r-th slice of each. Every batch is a list of
dataset indices in which positions (2i, 2i+1) form a pair, so same-prototype partners always land in the same batch
and on the same rank.

Guarantees, per epoch:
- Deterministic for (seed, epoch, prototype ids, num_replicas); independent of the rank that computes it.
- Every rank gets `len(sampler)` batches of exactly `batch_size` indices (distributed gathers need equal shards).
- Before the first clustering (`set_prototypes(None)`, the start state) batches are a uniformly random
  permutation cut into pairs: each image exactly once per epoch, except the `N mod (batch_size·num_replicas)` left
  over by `drop_last=True` (or, with `drop_last=False`, the start of the permutation repeated to fill the last batch).
- With prototype ids: each rank batch holds `(batch_size // 2) // 2` same-prototype pairs (one more in every
  other rank batch when batch_size/2 is odd, so the share is 50% over an epoch) and the rest cross-prototype pairs.
  Same pairs are two distinct images of one prototype (id >= 0); images with id -1 (unknown) go only into cross
  pairs, as do all images not used for same pairs. Each image appears at most once, unless the clusters are too
  small to supply enough same pairs: then same pairs are re-drawn from clusters of size >= 2 (some images twice)
  to keep the 50% share; with no such cluster at all, the batch is filled with cross pairs. A cross pair whose
  images happen to share a prototype is re-paired (a few vectorised rounds); the rare rest stays (e.g. a single
  prototype makes cross pairs impossible), see `stats`.

Mid-epoch resume: `state_dict()["position"]` counts the batches *delivered* this epoch (the loaders keep it
current; a loader that prefetches would otherwise count ahead); after `load_state_dict` the next iteration of that
epoch starts there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class PrototypePairSampler:
    """Batch sampler of same- and cross-prototype image pairs, sharded across ranks (SPEC §1.5).

    Args:
        num_images: dataset size N.
        batch_size: images per rank batch B (even: B/2 pairs).
        num_replicas: number of ranks W; default the process group's world size (1 without one).
        rank: this rank; default the process group's rank (0 without one).
        seed: base seed; the plan of epoch e depends on (seed, e) only.
        drop_last: drop the images that do not fill a last global batch (True), or fill it by repeating the start
            of the epoch's order (False).

    Raises:
        ValueError: num_images, batch_size, num_replicas or rank out of range.
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if num_replicas is None or rank is None:
            from .. import dist  # the distributed helpers only; data/ knows no model

            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not isinstance(batch_size, int) or batch_size < 2 or batch_size % 2:
            raise ValueError(
                f"PrototypePairSampler: batch_size must be an even int >= 2 (images per rank, B/2 pairs), "
                f"got {batch_size!r}"
            )
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"PrototypePairSampler: num_replicas must be an int >= 1, got {num_replicas!r}")
        if not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"PrototypePairSampler: rank must be in [0, {num_replicas}), got {rank!r}")
        global_batch = batch_size * num_replicas
        if not isinstance(num_images, int) or num_images < 2 or (drop_last and num_images < global_batch):
            raise ValueError(
                f"PrototypePairSampler: num_images must be >= batch_size·num_replicas = {global_batch} "
                f"with drop_last=True (and >= 2), got {num_images!r}; use a smaller batch or drop_last=False"
            )
        self.num_images = num_images
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0  # batches delivered this epoch (see the module docstring)
        self._resume_at: tuple[int, int] | None = None  # (epoch, position) to start the next iteration at
        self._ids: np.ndarray | None = None
        self._plan_key: tuple | None = None
        self._plan: np.ndarray | None = None  # (num_batches, W·B) global batches of this epoch
        self.stats: dict[str, float] = {}

    # ---- public API ----
    def __len__(self) -> int:
        """Batches per epoch on this rank (a resumed epoch yields `len - position`)."""
        per_batch = self.batch_size * self.num_replicas
        if self.drop_last:
            return self.num_images // per_batch
        return -(-self.num_images // per_batch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next iteration yields (call before every epoch, as DistributedSampler)."""
        if epoch != self.epoch:
            self.position = 0
        self.epoch = int(epoch)

    def set_prototypes(self, ids: torch.Tensor | np.ndarray | None) -> None:
        """Prototype id per image for the next plans; None = before clustering (uniform random pairs).

        Args:
            ids: (N,) integer prototype ids, -1 = unknown. Must be the same on every rank.

        Raises:
            ValueError: wrong shape or dtype, or ids < -1.
        """
        if ids is None:
            self._ids = None
        else:
            if isinstance(ids, torch.Tensor):
                if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                    raise ValueError(
                        f"PrototypePairSampler.set_prototypes: ids must be an integer tensor, got {ids.dtype}"
                    )
                arr = ids.detach().cpu().numpy()
            else:
                arr = np.asarray(ids)
                if not np.issubdtype(arr.dtype, np.integer):
                    raise ValueError(f"PrototypePairSampler.set_prototypes: ids must be integers, got {arr.dtype}")
            if arr.shape != (self.num_images,):
                raise ValueError(
                    f"PrototypePairSampler.set_prototypes: ids must have shape (num_images,)=({self.num_images},), "
                    f"got {tuple(arr.shape)}; pass one prototype id per dataset image, -1 for unknown"
                )
            if arr.size and arr.min() < -1:
                raise ValueError(f"PrototypePairSampler.set_prototypes: ids must be >= -1, got min {int(arr.min())}")
            self._ids = arr.astype(np.int64, copy=True)
        self._plan_key = None

    def state_dict(self) -> dict[str, Any]:
        """Epoch, seed and batches delivered so far in this epoch (prototype ids are re-set by the trainer)."""
        return {"epoch": self.epoch, "seed": self.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; the next iteration of that epoch resumes at its position."""
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state.get("position", 0))
        self._resume_at = (self.epoch, self.position) if self.position else None
        self._plan_key = None

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.global_batches()
        start = 0
        if self._resume_at is not None and self._resume_at[0] == self.epoch:
            start = min(self._resume_at[1], len(plan))
        self._resume_at = None
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        self.position = start
        for b in range(start, len(plan)):
            self.position = b + 1
            yield plan[b, lo:hi].tolist()

    def global_batches(self) -> np.ndarray:
        """This epoch's plan for all ranks: (len(self), W·B) int64; rank r's batch is columns [r·B, (r+1)·B)."""
        key = (self.seed, self.epoch)  # set_prototypes / load_state_dict clear the key
        if self._plan_key != key:
            self._plan = self._make_plan()
            self._plan_key = key
        return self._plan

    # ---- planning ----
    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, 0x5EC1])

    def _make_plan(self) -> np.ndarray:
        rng = self._rng()
        n, w, b = self.num_images, self.num_replicas, self.batch_size
        nb = len(self)
        gb = w * b
        if self._ids is None:
            order = rng.permutation(n)
            if nb * gb > n:  # drop_last=False: repeat the start of the permutation
                order = np.concatenate([order, np.resize(order, nb * gb - n)])
            self.stats = {"same_pairs": 0.0, "cross_pairs": float(nb * gb // 2), "same_share": 0.0}
            return order[: nb * gb].reshape(nb, gb)

        ids = self._ids
        pairs_per = b // 2
        # Same-pair count of every (global batch, rank) slot: half of the B/2 pairs, alternating the odd one.
        n_same = np.full((nb, w), pairs_per // 2, dtype=np.int64)
        if pairs_per % 2:
            n_same += (np.arange(nb)[:, None] * w + np.arange(w)[None, :]) % 2
        s_total = int(n_same.sum())
        total_pairs = nb * w * pairs_per
        same = _same_pairs(ids, s_total, rng)  # (s, 2)
        short = s_total - len(same)
        if short:
            log.warning(
                "PrototypePairSampler: no prototype has 2 images; epoch %d has %d fewer same-prototype pairs",
                self.epoch,
                short,
            )
        used = np.zeros(n, dtype=bool)
        used[same.ravel()] = True
        pool = rng.permutation(np.flatnonzero(~used))
        d_total = total_pairs - len(same)
        if len(pool) < 2 * d_total:  # only with drop_last=False: fill from a fresh permutation
            pool = np.concatenate([pool, np.resize(rng.permutation(n), 2 * d_total - len(pool))])
        cross, left = pool[: 2 * d_total].reshape(d_total, 2), pool[2 * d_total :]
        cross = _repair_cross(cross, left, ids, rng)

        # Lay out each rank batch: its same pairs, then its cross pairs, in a random pair order.
        out = np.empty((nb, w, pairs_per, 2), dtype=np.int64)
        s_off = c_off = 0
        for g in range(nb):
            for r in range(w):
                k = int(n_same[g, r]) if short == 0 else min(int(n_same[g, r]), len(same) - s_off)
                block = np.concatenate([same[s_off : s_off + k], cross[c_off : c_off + pairs_per - k]])
                s_off += k
                c_off += pairs_per - k
                out[g, r] = block[rng.permutation(pairs_per)]
        flat = out.reshape(nb, w * b)
        p0, p1 = ids[flat[:, 0::2]], ids[flat[:, 1::2]]
        same_share = float(((p0 == p1) & (p0 >= 0)).mean())
        self.stats = {"same_pairs": float(len(same)), "cross_pairs": float(d_total), "same_share": same_share}
        return flat


def _same_pairs(ids: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` pairs of distinct images sharing a prototype id >= 0, each image at most once while the clusters
    allow it, then drawn with replacement from clusters of size >= 2. (s, 2), s = count unless no cluster has 2."""
    known = np.flatnonzero(ids >= 0)
    if count == 0 or known.size < 2:
        return np.empty((0, 2), dtype=np.int64)
    # Group the known images by id, in a random order inside each group.
    known = rng.permutation(known)
    known = known[np.argsort(ids[known], kind="stable")]
    gid = ids[known]
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    sizes = np.diff(np.r_[starts, known.size])
    rank_in_group = np.arange(known.size) - np.repeat(starts, sizes)
    size_of = np.repeat(sizes, sizes)
    first = np.flatnonzero((rank_in_group % 2 == 0) & (rank_in_group + 1 < size_of))
    cand = np.stack([known[first], known[first + 1]], axis=1)
    cand = cand[rng.permutation(len(cand))]
    if len(cand) >= count:
        return cand[:count]
    big = np.flatnonzero(sizes >= 2)
    if big.size == 0:
        return cand
    # Top up: a random cluster of size >= 2 (weighted by size), then two distinct random members of it.
    extra = count - len(cand)
    g = rng.choice(big, size=extra, p=sizes[big] / sizes[big].sum())
    i = rng.integers(0, sizes[g])
    j = (i + rng.integers(1, sizes[g])) % sizes[g]
    top = np.stack([known[starts[g] + i], known[starts[g] + j]], axis=1)
    return np.concatenate([cand, top])


def _repair_cross(cross: np.ndarray, left: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Re-pair cross pairs whose two images share a prototype: shuffle their second members with those of randomly
    chosen other pairs (and unused images) until no pair collides or 20 rounds pass."""
    if len(cross) == 0:
        return cross
    cross = cross.copy()
    for _ in range(20):
        a, b = ids[cross[:, 0]], ids[cross[:, 1]]
        bad = np.flatnonzero((a == b) & (a >= 0))
        if bad.size == 0:
            break
        donors = rng.choice(len(cross), size=min(len(cross), bad.size), replace=False)
        slots = np.unique(np.concatenate([bad, donors]))
        seconds = np.concatenate([cross[slots, 1], left])
        seconds = seconds[rng.permutation(len(seconds))]
        cross[slots, 1] = seconds[: len(slots)]
        left = seconds[len(slots) :]
    return cross


def paper_pairs(
    batch_size: int, views: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's siamese pairs for one rank batch of this sampler (SPEC 1.2 `pairs=`): for every image pair
    (positions 2i, 2i+1) its 2 same-image pairs (view 0 with view 1 of each image) and 4 cross-image pairs (views
    0 and 1 of one image with views 0 and 1 of the other), as row indices of the view-major batch (row v·B + b).

    Returns:
        (i_idx, j_idx): two (3·B,) int64 tensors.

    Raises:
        ValueError: batch_size odd or < 2, or views < 2.
    """
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"paper_pairs: batch_size must be an even int >= 2, got {batch_size!r}")
    if views < 2:
        raise ValueError(f"paper_pairs: the paper's pairs need views >= 2 (aug.views), got {views!r}")
    a = torch.arange(0, batch_size, 2, device=device)  # (B/2,) first image of each pair
    b = a + 1
    a1, a2, b1, b2 = a, a + batch_size, b, b + batch_size
    i_idx = torch.cat([a1, b1, a1, a1, a2, a2])
    j_idx = torch.cat([a2, b2, b1, b2, b1, b2])
    return i_idx, j_idx
