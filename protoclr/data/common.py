"""What the DALI and the torchvision loaders share: the output contract, per-batch seeds, epoch bookkeeping, the
eval loaders' batching and skip log.

Output contract of a training loader: each step yields `(views, index)`, `views` a list of V large then
`n_small_crops` small float32 tensors (B, 3, H, W) on the training device, channels_last, normalised with the
config's mean/std; `index` (B,) int64 dataset indices on the same device (the loss's `inst`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from .augment import IMAGENET_MEAN, IMAGENET_STD, eval_resize_size
from .folder import ImageDataset, SkipLog


def batch_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """Seed of one batch's augmentations: a function of (seed, epoch, rank, batch position) only, so a batch looks
    the same however many workers or restarts produced it."""
    return int(np.random.SeedSequence([seed, epoch, rank, position, 0xA06]).generate_state(1)[0])


def norm_stats(mean: Sequence[float], std: Sequence[float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) float32 mean and std on the 0..255 pixel scale."""
    m = torch.tensor([255.0 * v for v in mean], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s = torch.tensor([255.0 * v for v in std], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return m, s


def normalise_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float32 normalised on `device`, channels_last. The copy to the device moves uint8
    (4× fewer bytes than float) and the arithmetic runs there."""
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    return x.to(torch.float32).sub_(mean).div_(std)


class LoaderBase:
    """Epoch bookkeeping shared by the training loaders: length, skip counting, sampler position."""

    def __init__(self, dataset: ImageDataset, sampler: Iterable[list[int]], device: torch.device, seed: int) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.device = torch.device(device)
        self.seed = int(seed)
        self._skips = SkipLog(type(self).__name__)

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def skipped(self) -> int:
        """Unreadable images skipped in the current (or last finished) epoch."""
        return self._skips.count

    @property
    def epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    @property
    def rank(self) -> int:
        return int(getattr(self.sampler, "rank", 0))

    def state_dict(self) -> dict:
        """Loader state to checkpoint beyond the sampler's position (per rank); {} when a batch depends on
        (seed, epoch, rank, position) alone."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` before the next `__iter__`."""

    def _delivered(self, position: int) -> None:
        # A loader prefetches, so the sampler's own count runs ahead of what the trainer has received.
        if hasattr(self.sampler, "position"):
            self.sampler.position = position


class EvalLoaderBase:
    """Eval loader: resize + centre crop + normalise, in the order of `indices`; see `build_eval_loader`.
    An unreadable image comes out as an all-zero (mean-colour) image, keeping its index and label.

    What both backends share: the arguments, the batches of `indices` (the last may be smaller), and the log of the
    unreadable images of the current (or last) pass."""

    def __init__(
        self,
        dataset: ImageDataset,
        image_size: int,
        batch_size: int,
        device: torch.device,
        indices: Sequence[int],
        num_workers: int = 2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        resize_size: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.indices = [int(i) for i in indices]
        self.num_workers = num_workers
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize_size = resize_size or eval_resize_size(image_size)
        self._skips = SkipLog(type(self).__name__)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def batches(self) -> list[list[int]]:
        return [self.indices[s : s + self.batch_size] for s in range(0, len(self.indices), self.batch_size)]

    @property
    def skipped(self) -> int:
        return self._skips.count

    @property
    def skipped_paths(self) -> list[str]:
        """Paths of the unreadable images of the current (or last) pass, one entry per skip."""
        return list(self._skips.paths)


def positioned(sampler: Iterable[list[int]]) -> Iterable[tuple[int, list[int]]]:
    """(position in the epoch, batch) for each batch; a resumed PrototypePairSampler starts past 0."""
    has_pos = hasattr(sampler, "position")
    for k, batch in enumerate(sampler):
        # PrototypePairSampler sets `position` to (batch number + 1) as it yields.
        yield (int(sampler.position) - 1 if has_pos else k), list(batch)
