"""`FeatureBank`: the features the training forward computed during an epoch, index-aligned, as the E-step's
input instead of a second pass over the data (cluster.features=bank)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed

from .. import dist
from ..ops import checks
from .common import check_int, fail


class FeatureBank:
    """Index-aligned features of the training forward pass: the E-step's input without a second pass over the
    data (cluster.features=bank; DeepCluster-v2 / SwAV keep such a memory too).

    Row i is the mean over the views of image i's pooled feature h as the training forward computed it
    (augmented views, train-mode BatchNorm), detached. The mean rather than the first view: it averages the
    augmentation noise out, as the pass's centre crop avoids it, for the same memory and one add per step.

    Sharding is that of `extract_features`: each rank adds the images of its own batches to its own (N, D)
    tensor (zeros elsewhere) and `gather` sums the tensors over ranks in place, which is exact in any dtype
    because a row is written on one rank only (x + 0 = x); every rank then holds the same index-ordered matrix
    and `kmeans` works on a contiguous block of it per rank. An index met several times in an epoch (a corrupt
    file's substitute in its batch, a same-prototype pair drawn twice) is averaged over its count; an index
    never met (the rest `drop_last` leaves, a corrupt file) is absent and gets no prototype (-1).

    Memory: N·D elements of `dtype` per rank plus N int32 counts. The trainer uses the forward's own dtype
    (bf16 under bf16 autocast, whose h is bf16 already; fp32 or fp64 otherwise).

    Attributes:
        feats: (N, D) sum of the view means written this epoch on this rank (summed over ranks after `gather`).
        counts: (N,) int32 times each index was written.
        epoch: the epoch being collected (set by `reset`), None when the bank collects nothing.
    """

    def __init__(
        self, num_images: int, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        check_int("FeatureBank", "num_images", num_images, 1)
        check_int("FeatureBank", "dim", dim, 1)
        if dtype not in checks.FLOAT_DTYPES:
            fail("FeatureBank", f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        self.feats = torch.zeros(num_images, dim, dtype=dtype, device=device)
        self.counts = torch.zeros(num_images, dtype=torch.int32, device=device)
        self.epoch: int | None = None

    @property
    def num_images(self) -> int:
        return self.feats.size(0)

    def __repr__(self) -> str:
        d, dtype = self.feats.size(1), self.feats.dtype
        return f"FeatureBank(num_images={self.num_images}, dim={d}, {dtype}, epoch={self.epoch})"

    def reset(self, epoch: int | None) -> None:
        """Empty the bank and start collecting `epoch` (None: collect nothing)."""
        self.feats.zero_()
        self.counts.zero_()
        self.epoch = epoch

    @torch.no_grad()
    def add(self, index: torch.Tensor, h: torch.Tensor) -> None:
        """Write the view mean of h (V·B, D), view-major (view v of image b is row v·B + b, as the trainer's
        forward lays them out), to the rows `index` (B,) int64 (on the bank's device)."""
        b, d = index.numel(), self.feats.size(1)
        if h.dim() != 2 or b == 0 or h.size(0) % b or h.size(1) != d:
            fail("FeatureBank.add", f"h must be (V·B, D) with B={b} (index) and D={d}, got {tuple(h.shape)}")
        mean = h.detach().view(-1, b, d).mean(0)  # in h's dtype (fp32 after the trainer's cast), then rounded once
        self.feats.index_add_(0, index, mean.to(self.feats.dtype))
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.int32))

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, D), present (N,) bool) of the collected epoch, identical on every rank: a collective under
        a process group. Sums over ranks in place (no copy of the bank) and ends the collection (epoch = None)."""
        if dist.is_dist():
            torch.distributed.all_reduce(self.feats)
            torch.distributed.all_reduce(self.counts)
        self.epoch = None
        if int(self.counts.max()) > 1:
            self.feats /= self.counts.clamp(min=1)[:, None].to(self.feats.dtype)
        return self.feats, self.counts > 0

    def state_dict(self) -> dict:
        """The rows met so far in this epoch, summed over ranks (a collective: every rank calls it), on the CPU:
        {"epoch", "index" (M,), "feats" (M, D), "counts" (M,)}. For mid-epoch checkpoints: with `load_state_dict`
        a resumed epoch gathers bitwise the bank of an uninterrupted one."""
        feats, counts = dist.all_reduce_sum(self.feats), dist.all_reduce_sum(self.counts)
        index = counts.nonzero().flatten()
        return {"epoch": self.epoch, "index": index.cpu(), "feats": feats[index].cpu(), "counts": counts[index].cpu()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore `state_dict()`: rank 0 holds the saved rows, the other ranks none, so the sum over ranks at
        `gather` is the same whatever the world size.

        Raises:
            ValueError: missing keys, or rows of another dataset size or feature width.
        """
        fn = "FeatureBank.load_state_dict"
        keys = {"epoch", "index", "feats", "counts"}
        if not isinstance(state, Mapping) or set(state) != keys:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            fail(fn, f"state must hold exactly the keys {sorted(keys)}, got {got}")
        index, feats = state["index"], state["feats"]
        if index.numel() and int(index.max()) >= self.num_images:
            fail(fn, f"index reaches {int(index.max())} but num_images={self.num_images}: the dataset changed size")
        if feats.shape != (index.numel(), self.feats.size(1)):
            fail(fn, f"feats must be ({index.numel()}, {self.feats.size(1)}), got {tuple(feats.shape)}")
        self.reset(int(state["epoch"]))
        if dist.get_rank() == 0:
            index = index.to(self.feats.device)
            self.feats[index] = feats.to(self.feats)
            self.counts[index] = state["counts"].to(self.counts)
