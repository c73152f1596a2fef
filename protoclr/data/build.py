"""Loader construction: backend choice ("auto" | "dali" | "torch") and argument checks."""

from __future__ import annotations

import functools
import io
import logging
import os
from collections.abc import Iterable, Sequence

import torch

from .augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig
from .folder import ImageDataset

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali", "torch")
_logged: set[tuple[str, str]] = set()


@functools.cache
def _dali_usable(device_type: str, device_index: int | None) -> str | None:
    """None when a DALI pipeline builds and decodes an image on this device, else the reason."""
    from .dali import _build, _decode_graph, dali_available

    why = dali_available()
    if why is not None:
        return why
    try:
        import numpy as np
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buf, "PNG")
        device_id = None if device_type != "cuda" else (device_index if device_index is not None else 0)
        pipe = _build(_decode_graph, 1, 1, device_id, 0, gpu=device_type == "cuda")
        pipe.feed_input("enc", [np.frombuffer(buf.getvalue(), dtype=np.uint8)])
        pipe.run()
        del pipe
    except Exception as e:  # a broken CUDA/driver combination surfaces here as any error type
        return f"DALI is installed but a test pipeline failed on {device_type} ({type(e).__name__}: {e})"
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """The loader backend, "dali" or "torch", for `backend` on `device`.

    "auto" (or $PROTOCLR_DATA_BACKEND) takes DALI when it works here (in CPU mode without a GPU), else the
    torchvision fallback; an explicit "dali" that cannot run raises.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: backend="dali" but DALI is unusable (the message says why).
    """
    if backend == "auto":
        backend = os.environ.get("PROTOCLR_DATA_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"data loader backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    why = _dali_usable(device.type, device.index)
    if backend == "dali":
        if why is not None:
            raise RuntimeError(f"data loader backend 'dali' is unavailable: {why}; or pass backend='torch'")
        return "dali"
    pick = "dali" if why is None else "torch"
    if (pick, device.type) not in _logged:
        _logged.add((pick, device.type))
        log.info(
            "protoclr.data: loader backend 'auto' on %s uses %r%s",
            device.type,
            pick,
            "" if why is None else f" ({why})",
        )
    return pick


def build_train_loader(
    dataset: ImageDataset,
    sampler: Iterable[list[int]],
    aug: AugmentConfig,
    device: torch.device | str,
    backend: str = "auto",
    num_workers: int = 2,
    seed: int = 0,
):
    """Training loader: `for views, index in loader`.

    Args:
        dataset: `scan_image_folder(...)` result; images in dataset-index order.
        sampler: batch sampler yielding lists of B dataset indices, e.g. PrototypePairSampler (its `epoch`, `rank`
            and `position` are read when present).
        aug: augmentation config (SPEC §2), shared by both backends.
        device: where the views land (a CUDA device makes DALI decode with nvJPEG).
        backend: "auto" | "dali" | "torch" (see `resolve_backend`).
        num_workers: DALI threads or DataLoader worker processes.
        seed: augmentation seed; a batch depends on (seed, epoch, rank, batch position) only.

    Returns:
        An iterable with `len(loader) == len(sampler)` and `loader.skipped`, yielding `views`: list of
        `aug.views + aug.n_small_crops` float32 (B, 3, H, W) tensors on `device`, channels_last, normalised (large
        views first, H = aug.image_size; then small ones, H = aug.small_size_resolved), and `index`: (B,) int64
        dataset indices on `device` (the loss's `inst`).

    Raises:
        ValueError: bad argument (names it).
        RuntimeError: backend="dali" and DALI is unusable.
    """
    if not isinstance(dataset, ImageDataset):
        raise ValueError(
            f"build_train_loader: dataset must be an ImageDataset (scan_image_folder), got {type(dataset)}"
        )
    if not isinstance(aug, AugmentConfig):
        raise ValueError(f"build_train_loader: aug must be an AugmentConfig, got {type(aug).__name__}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"build_train_loader: num_workers must be an int >= 0, got {num_workers!r}")
    n = getattr(sampler, "num_images", len(dataset))
    if n != len(dataset):
        raise ValueError(
            f"build_train_loader: sampler.num_images={n} but the dataset has {len(dataset)} images; build the sampler "
            "with num_images=len(dataset)"
        )
    device = torch.device(device)
    if resolve_backend(backend, device) == "dali":
        from .dali import DaliTrainLoader

        return DaliTrainLoader(dataset, sampler, aug, device, num_workers=num_workers, seed=seed)
    from .torch_loader import TorchTrainLoader

    return TorchTrainLoader(dataset, sampler, aug, device, num_workers=num_workers, seed=seed)


def build_eval_loader(
    dataset: ImageDataset,
    image_size: int,
    batch_size: int,
    device: torch.device | str,
    indices: torch.Tensor | Sequence[int] | None = None,
    num_workers: int = 2,
    backend: str = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize_size: int | None = None,
    aug: AugmentConfig | None = None,
):
    """Eval loader (feature extraction, k-NN, linear probe): `for images, labels, index in loader`.

    Args:
        dataset: images in dataset-index order.
        image_size: side of the centre crop.
        batch_size: images per batch (the last batch may be smaller).
        device: where the outputs land.
        indices: (M,) dataset indices to visit, in this order; None = all, 0..N-1 (SPEC §1: the E-step encodes in
            dataset-index order).
        num_workers: DALI threads or DataLoader workers.
        backend: "auto" | "dali" | "torch".
        mean, std: normalisation; default `aug`'s, else ImageNet's.
        resize_size: shorter-side resize before the crop; default `augment.eval_resize_size(image_size)`.
        aug: take mean/std from this training config (so evaluation normalises as training does).

    Returns:
        An iterable of `images` float32 (b, 3, image_size, image_size) channels_last normalised, `labels` (b,) int64,
        `index` (b,) int64, all on `device`; `len(loader)` batches; `loader.skipped` counts unreadable images
        (given as all-zero images, keeping their index and label) and `loader.skipped_paths` names them.

    Raises:
        ValueError: bad argument (names it).
    """
    if not isinstance(dataset, ImageDataset):
        raise ValueError(f"build_eval_loader: dataset must be an ImageDataset (scan_image_folder), got {type(dataset)}")
    for name, v in (("image_size", image_size), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"build_eval_loader: {name} must be a positive int, got {v!r}")
    if indices is None:
        idx = list(range(len(dataset)))
    else:
        t = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(list(indices), dtype=torch.int64)
        if t.ndim != 1 or t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"build_eval_loader: indices must be a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= len(dataset)):
            raise ValueError(
                f"build_eval_loader: indices must lie in [0, {len(dataset)}), got [{int(t.min())}, {int(t.max())}]"
            )
        idx = t.tolist()
    mean = tuple(mean if mean is not None else (aug.mean if aug is not None else IMAGENET_MEAN))
    std = tuple(std if std is not None else (aug.std if aug is not None else IMAGENET_STD))
    device = torch.device(device)
    kwargs = dict(indices=idx, num_workers=num_workers, mean=mean, std=std, resize_size=resize_size)
    if resolve_backend(backend, device) == "dali":
        from .dali import DaliEvalLoader

        return DaliEvalLoader(dataset, image_size, batch_size, device, **kwargs)
    from .torch_loader import TorchEvalLoader

    return TorchEvalLoader(dataset, image_size, batch_size, device, **kwargs)
