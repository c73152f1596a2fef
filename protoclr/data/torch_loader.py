"""Fallback loaders on torchvision transforms v2, for machines without DALI; same output contract as `dali.py`.

Design: one DataLoader item is one whole batch. The batch sampler runs in the main process and hands each worker
`(seed, indices)`; the worker reads, screens (`check_encoded`, as the DALI path does) and decodes the images
(PIL, see `decode_file`), replaces unreadable ones from the same batch (`folder.substitute`),
and applies the views' transforms to uint8 tensors under a per-batch seed. So the output depends on
(seed, epoch, rank, batch position) only — not on the number of workers — and the sampler's order is kept.
Workers return uint8 channels_last batches; normalisation runs on the training device after the copy (4× fewer
bytes to move, and the arithmetic runs on the GPU when there is one).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .augment import AugmentConfig, ViewSpec, blur_kernel_size
from .common import EvalLoaderBase, LoaderBase, batch_seed, norm_stats, normalise_uint8, positioned
from .folder import ImageDataset, check_encoded, find_good_index, substitute

log = logging.getLogger(__name__)


def decode_file(path: str) -> tuple[torch.Tensor | None, str | None]:
    """Read and decode one image to uint8 (3, H, W) RGB; (None, reason) when it is unreadable or corrupt."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    why = check_encoded(data)
    if why is not None:
        return None, why
    # PIL, not torchvision.io: libpng errors inside torchvision's decode_png crash the process (segfault on a
    # damaged IDAT, seen with torchvision 0.29), and a worker crash would stop training. PIL raises instead.
    try:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for damaged data
        return None, f"cannot decode: {type(e).__name__}: {e}"
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        return None, f"decoded to an unusable shape {tuple(img.shape)}"
    return img, None


def view_transform(spec: ViewSpec, aug: AugmentConfig):
    """torchvision v2 transform of one view on a uint8 (3, H, W) tensor (SPEC §2 order, see augment.py)."""
    from torchvision.transforms import v2

    b, c, s, h = aug.jitter
    steps = [
        v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=aug.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(aug.flip_p),
        v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=aug.jitter_p),
        v2.RandomGrayscale(aug.grayscale_p),
    ]
    if spec.blur:
        steps.append(v2.RandomApply([v2.GaussianBlur(blur_kernel_size(spec.size), sigma=aug.blur_sigma)], p=aug.blur_p))
    return v2.Compose(steps)


@contextlib.contextmanager
def _one_thread():
    """Run per-image transforms single-threaded. DataLoader workers already are; in the main process
    (num_workers=0) intra-op threads on tiny images cost 10× more in synchronisation than they save."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)


class _TrainBatches(Dataset):
    """Map-style dataset keyed by (seed, indices): one item is one augmented batch (runs in the workers)."""

    def __init__(self, samples: list[tuple[str, int]], aug: AugmentConfig) -> None:
        self.samples = samples
        self.aug = aug
        # Built (and torchvision.transforms.v2 imported, which pulls in torch._dynamo: seconds) here in the main
        # process, so forked workers inherit it instead of each paying the import on its first batch.
        self._transforms = [view_transform(spec, aug) for spec in aug.view_specs()]

    def __len__(self) -> int:  # the sampler, not this, drives iteration
        return len(self.samples)

    def __getitem__(self, key: tuple[int, list[int]]):
        seed, indices = key
        n = len(indices)
        images: list[torch.Tensor | None] = []
        skipped: list[tuple[str, str]] = []
        for i in indices:
            img, why = decode_file(self.samples[i][0])
            images.append(img)
            if why is not None:
                skipped.append((self.samples[i][0], why))
        index = list(indices)
        bad = [p for p, img in enumerate(images) if img is None]
        if bad:
            repl = substitute(bad, n)
            if not repl:  # the whole batch is unreadable: borrow the next readable dataset image
                good = find_good_index(
                    indices[0] + 1, len(self.samples), lambda j: decode_file(self.samples[j][0])[0] is not None
                )
                img, _ = decode_file(self.samples[good][0])
                images, index = [img] * n, [good] * n
            else:
                for p, q in repl.items():
                    images[p], index[p] = images[q], index[q]
        # Transforms draw from torch's global RNG: pin it to this batch's seed without disturbing the caller's.
        with torch.random.fork_rng(devices=[]), _one_thread():
            torch.manual_seed(seed)
            views = []
            for t in self._transforms:
                v = torch.stack([t(img) for img in images])
                views.append(v.contiguous(memory_format=torch.channels_last))
        return views, torch.tensor(index, dtype=torch.int64), skipped


class _Keys:
    """Re-iterable source of (seed, indices) keys for the DataLoader: one pass of the batch sampler per epoch.
    It holds no reference to the loader: a cycle through the DataLoader would leave its worker shutdown to the
    garbage collector, which may close the worker queues first (then every shutdown waits out a 5 s timeout)."""

    def __init__(self, sampler, seed: int, positions: list[int]) -> None:
        self.sampler = sampler
        self.seed = seed
        self.positions = positions

    def __iter__(self):
        epoch, rank = int(getattr(self.sampler, "epoch", 0)), int(getattr(self.sampler, "rank", 0))
        for pos, batch in positioned(self.sampler):
            self.positions.append(pos)
            yield batch_seed(self.seed, epoch, rank, pos), batch

    def __len__(self) -> int:
        return len(self.sampler)


class TorchTrainLoader(LoaderBase):
    """Training loader on torchvision v2 (see the module docstring); build it with `build_train_loader`.

    Args:
        dataset: images in dataset-index order.
        sampler: batch sampler yielding lists of dataset indices (PrototypePairSampler).
        aug: augmentation config.
        device: where the views land.
        num_workers: decoding processes (0 = in the main process).
        seed: augmentation seed; batches depend on (seed, epoch, rank, position).
        prefetch_factor: batches each worker prepares ahead.
    """

    backend = "torch"

    def __init__(
        self,
        dataset: ImageDataset,
        sampler,
        aug: AugmentConfig,
        device: torch.device,
        num_workers: int = 2,
        seed: int = 0,
        prefetch_factor: int = 2,
    ) -> None:
        super().__init__(dataset, sampler, device, seed)
        self.aug = aug
        self._mean, self._std = norm_stats(aug.mean, aug.std, self.device)
        self._positions: list[int] = []
        self._loader = DataLoader(
            _TrainBatches(dataset.samples, aug),
            batch_size=None,
            sampler=_Keys(sampler, self.seed, self._positions),
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self._skips.reset()
        self._positions.clear()
        epoch = self.epoch
        try:
            for k, (views, index, skipped) in enumerate(self._loader):
                for path, why in skipped:
                    self._skips.add(path, why)
                views = [normalise_uint8(v, self._mean, self._std, self.device) for v in views]
                index = index.to(self.device, non_blocking=True)
                self._delivered(self._positions[k] + 1)
                yield views, index
        finally:
            self._skips.report(epoch)


class _EvalBatches(Dataset):
    def __init__(self, samples: list[tuple[str, int]], image_size: int, resize_size: int) -> None:
        self.samples = samples
        self.image_size = image_size
        self.resize_size = resize_size
        from torchvision.transforms import v2  # in the main process: see _TrainBatches

        self._t = v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, indices: list[int]):
        out = torch.zeros(len(indices), 3, self.image_size, self.image_size, dtype=torch.uint8)
        ok = torch.ones(len(indices), dtype=torch.bool)
        skipped = []
        with _one_thread():
            for p, i in enumerate(indices):
                img, why = decode_file(self.samples[i][0])
                if img is None:
                    ok[p] = False
                    skipped.append((self.samples[i][0], why))
                else:
                    out[p] = self._t(img)
        labels = torch.tensor([self.samples[i][1] for i in indices], dtype=torch.int64)
        return out.contiguous(memory_format=torch.channels_last), labels, torch.tensor(indices), ok, skipped


class TorchEvalLoader(EvalLoaderBase):
    """The eval loader (`common.EvalLoaderBase`) on torchvision: decoding in DataLoader workers."""

    backend = "torch"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._mean, self._std = norm_stats(self.mean, self.std, self.device)
        self._loader = DataLoader(
            _EvalBatches(self.dataset.samples, self.image_size, self.resize_size),
            batch_size=None,
            sampler=self.batches(),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def __iter__(self):
        self._skips.reset()
        try:
            for images, labels, index, ok, skipped in self._loader:
                for path, why in skipped:
                    self._skips.add(path, why)
                x = normalise_uint8(images, self._mean, self._std, self.device)
                if not bool(ok.all()):
                    x[~ok.to(self.device)] = 0.0
                yield x, labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)
        finally:
            self._skips.report(None)
