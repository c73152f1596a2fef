"""DALI loaders: decoding with nvJPEG (`mixed`) on a GPU or on the CPU without one, SPEC §2 augmentations.

Design choices:
- Input is `fn.external_source` fed in batch-sampler order, not DALI's file reader: the PrototypePairSampler
  decides which images share a batch (and shards them across ranks), which a reader's own shuffling cannot do.
  Files are read by a small thread pool a few batches ahead of the pipeline, so I/O overlaps decoding.
- Bad data: a decode error in DALI invalidates the whole pipeline, so files are screened before they are fed
  (`folder.check_encoded`: empty, unknown header, truncated JPEG/PNG — a header parse, not a decode). What gets
  past the screen and still fails to decode (damage inside the compressed stream) is handled by recovery: the
  batches in flight are decoded one image at a time by a decode-only pipeline to find the culprit, it is marked
  bad, and the pipeline is rebuilt and re-fed from the first batch not yet delivered. Either way the bad image's
  slot is taken by another image of its batch (`folder.substitute`), the skip is counted, and one warning per
  epoch reports them. Nothing is decoded twice in the normal case.
- Determinism: DALI's random operators are seeded at build time, so a pipeline is built per epoch (and after a
  recovery) with a seed derived from (seed, epoch, rank, batch position): an epoch's augmentations do not depend
  on earlier epochs. Mid-epoch, the random state has moved on from that seed, so the training loader's
  `state_dict()` carries a DALI checkpoint (`enable_checkpointing`: the state of every random operator after the
  last batch delivered) and a resumed run rebuilds its first pipeline from it: the same augmentations as a run
  that never stopped.
- Views are produced as HWC and returned as `permute(0, 3, 1, 2)` views of them: exactly channels_last NCHW with no
  copy. Colour jitter follows torchvision's factor ranges (contrast pivots on the image's mean grey level as in
  torchvision, brightness scales, saturation and hue in `fn.hsv`; DALI applies them in a fixed order where
  torchvision shuffles it); grayscale is BT.601 luma on three channels, as torchvision's. Jitter, grayscale and
  blur are DALI conditionals, so views that skip them cost nothing; the tests check that both loaders give the same
  statistics per component.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .augment import AugmentConfig, ViewSpec, blur_kernel_size
from .common import EvalLoaderBase, LoaderBase, batch_seed, positioned
from .folder import ImageDataset, check_encoded, find_good_index, substitute

log = logging.getLogger(__name__)


@functools.cache
def dali_available() -> str | None:
    """None when DALI can be used, else the reason (DALI runs in CPU mode without a GPU)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising at load time
        return f"nvidia-dali is not importable ({type(e).__name__}: {e}); install nvidia-dali-cuda130"
    return None


def _device_id(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


# ---------------------------------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------------------------------


def _uniform(lo: float, hi: float):
    """Per-sample U[lo, hi), or the constant when the range is empty (DALI rejects lo == hi)."""
    from nvidia.dali import fn

    return float(lo) if hi <= lo else fn.random.uniform(range=(lo, hi))


def _coin(p: float):
    """Per-sample Bernoulli(p) predicate for a DALI conditional; a plain bool when p is 0 or 1 (no split)."""
    from nvidia.dali import fn, types

    return p >= 1 or (p > 0 and fn.random.coin_flip(probability=p, dtype=types.BOOL))


def _view(img, spec: ViewSpec, aug: AugmentConfig, gpu: bool):
    """One augmented view of decoded uint8 HWC images, as normalised float32 HWC (SPEC §2)."""
    from nvidia.dali import fn, types

    v = fn.random_resized_crop(
        img,
        size=(spec.size, spec.size),
        random_area=spec.scale,
        random_aspect_ratio=aug.crop_ratio,
        antialias=True,
        interp_type=types.INTERP_LINEAR,
    )
    (b_lo, b_hi), (c_lo, c_hi), (s_lo, s_hi), (h_lo, h_hi) = aug.jitter_ranges()
    if aug.jitter_p > 0 and any(aug.jitter) and _coin(aug.jitter_p):
        if (b_lo, b_hi, c_lo, c_hi) != (1, 1, 1, 1):
            # torchvision's contrast blends with the mean grey level of the image, not mid-grey: compute it.
            rgb_mean = fn.reductions.mean(fn.cast(v, dtype=types.FLOAT), axes=[0, 1])
            grey = 0.299 * rgb_mean[0] + 0.587 * rgb_mean[1] + 0.114 * rgb_mean[2]
            if gpu:  # named arguments are read on the host: one scalar per image (the dynamic executor allows it)
                grey = grey.cpu()
            v = fn.brightness_contrast(
                v, brightness=_uniform(b_lo, b_hi), contrast=_uniform(c_lo, c_hi), contrast_center=grey
            )
        if (s_lo, s_hi, h_lo, h_hi) != (1, 1, 0, 0):
            v = fn.hsv(v, hue=_uniform(360.0 * h_lo, 360.0 * h_hi), saturation=_uniform(s_lo, s_hi))
    if aug.grayscale_p > 0 and _coin(aug.grayscale_p):
        # Exact BT.601 luma on three equal channels, as torchvision (hsv with saturation 0 leaves ±1 level).
        g = fn.color_space_conversion(v, image_type=types.RGB, output_type=types.GRAY)
        v = fn.cat(g, g, g, axis=2)
    if spec.blur and aug.blur_p > 0 and _coin(aug.blur_p):
        v = fn.gaussian_blur(v, window_size=blur_kernel_size(spec.size), sigma=_uniform(*aug.blur_sigma))
    return fn.crop_mirror_normalize(
        v,
        dtype=types.FLOAT,
        output_layout="HWC",
        mean=[255.0 * m for m in aug.mean],
        std=[255.0 * s for s in aug.std],
        mirror=fn.random.coin_flip(probability=aug.flip_p) if 0 < aug.flip_p < 1 else int(aug.flip_p >= 1),
    )


def _decode(enc, gpu: bool):
    from nvidia.dali import fn, types

    if gpu:
        # Pre-sized nvJPEG buffers avoid reallocations during the first epoch (values from DALI's RN50 example).
        return fn.decoders.image(
            enc, device="mixed", output_type=types.RGB, device_memory_padding=211025920, host_memory_padding=140544512
        )
    return fn.decoders.image(enc, device="cpu", output_type=types.RGB)


def _build(
    graph,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    seed: int,
    checkpointing: bool = False,
    checkpoint: str | None = None,
    **kwargs,
):
    """Build a pipeline of `graph(**kwargs)`. With `checkpointing`, `pipe.checkpoint()` captures the state of its
    random operators after the last batch taken; `checkpoint` restores such a state (instead of the seed's)."""
    import warnings

    from nvidia.dali import pipeline_def

    @pipeline_def(enable_conditionals=True, enable_checkpointing=checkpointing)
    def pipe():
        return graph(**kwargs)

    # exec_dynamic (DALI 2's default, named to be explicit): needed for the GPU→CPU step of the jitter's contrast.
    with warnings.catch_warnings():
        # "DALI doesn't capture state of such 'source'": by design, the feeder follows the sampler's position.
        warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
        p = pipe(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            seed=seed % (2**31),
            prefetch_queue_depth=2,
            exec_dynamic=True,
            checkpoint=checkpoint,
        )
        p.build()
    return p


def _train_graph(source, aug: AugmentConfig, gpu: bool):
    from nvidia.dali import fn, types

    enc = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, no_copy=False)
    img = _decode(enc, gpu)
    return tuple(_view(img, spec, aug, gpu) for spec in aug.view_specs())


def _eval_graph(source, image_size: int, resize_size: int, mean, std, gpu: bool):
    from nvidia.dali import fn, types

    enc = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1, no_copy=False)
    img = _decode(enc, gpu)
    img = fn.resize(img, resize_shorter=resize_size, antialias=True, interp_type=types.INTERP_LINEAR)
    return fn.crop_mirror_normalize(
        img,
        dtype=types.FLOAT,
        output_layout="HWC",
        crop=(image_size, image_size),
        crop_pos_x=0.5,
        crop_pos_y=0.5,
        mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std],
    )


def _decode_graph(gpu: bool):
    from nvidia.dali import fn, types

    return _decode(fn.external_source(name="enc", dtype=types.UINT8, ndim=1), gpu)


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """DALI TensorList (B, H, W, C) → torch (B, C, H, W) channels_last on `device`. DALI reuses its output
    buffers, so this copies (into a fresh tensor, on the current stream on a GPU)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    t = tl.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device if tl.__class__.__name__.endswith("GPU") else "cpu")
    stream = torch.cuda.current_stream(out.device) if out.is_cuda else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out.to(device, non_blocking=True).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# Feeding and recovery
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """A batch as read from disk: raw bytes and screening verdict per slot; `fill` applies substitutions."""

    position: int
    indices: list[int]
    raw: list[bytes | None]
    why: list[str | None]
    encoded: list[np.ndarray] | None = None
    index: list[int] | None = None


class _Feeder:
    """Reads, screens and substitutes batches ahead of the pipeline; DALI pulls them through `__call__`."""

    def __init__(
        self, dataset: ImageDataset, batches, num_threads: int, bad: dict[str, str], lookahead: int = 4
    ) -> None:
        self.samples = dataset.samples
        self.batches = iter(batches)
        self.pool = ThreadPoolExecutor(max_workers=max(1, num_threads), thread_name_prefix="protoclr-read")
        self.lookahead = lookahead
        self.futures: deque = deque()
        self.front: deque[_Batch] = deque()  # batches to feed again after a recovery, before new ones
        self.inflight: deque[_Batch] = deque()  # fed to DALI, output not yet taken
        # path -> reason, for files that passed the screen but failed to decode; owned by the loader, so a file is
        # diagnosed once per run, not once per epoch.
        self.bad = bad
        self.lock = threading.Lock()
        self._fill_queue()

    def _fill_queue(self) -> None:
        while len(self.futures) < self.lookahead:
            try:
                pos, batch = next(self.batches)
            except StopIteration:
                return
            self.futures.append(self.pool.submit(self._read, pos, batch))

    def _read_one(self, i: int) -> tuple[bytes | None, str | None]:
        path = self.samples[i][0]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            return None, f"unreadable: {e.strerror or e}"
        return data, check_encoded(data)

    def _read(self, pos: int, batch: list[int]) -> _Batch:
        raw, why = zip(*(self._read_one(i) for i in batch)) if batch else ((), ())
        return _Batch(pos, list(batch), list(raw), list(why))

    def fill(self, b: _Batch) -> _Batch:
        """Apply substitutions for the slots known bad now (screen, or decode failures found so far)."""
        why = [w or self.bad.get(self.samples[i][0]) for i, w in zip(b.indices, b.why)]
        bad = [p for p, w in enumerate(why) if w is not None]
        index, raw = list(b.indices), list(b.raw)
        if bad:
            repl = substitute(bad, len(index))
            if repl:
                for p, q in repl.items():
                    index[p], raw[p] = index[q], raw[q]
            else:

                def good(j: int) -> bool:
                    data, w = self._read_one(j)
                    return w is None and self.samples[j][0] not in self.bad

                j = find_good_index(b.indices[0] + 1, len(self.samples), good)
                data, _ = self._read_one(j)
                index, raw = [j] * len(index), [data] * len(index)
        b.index = index
        b.encoded = [np.frombuffer(r, dtype=np.uint8) for r in raw]
        return b

    def skipped(self, b: _Batch) -> list[tuple[str, str]]:
        out = []
        for i, w in zip(b.indices, b.why):
            path = self.samples[i][0]
            w = w or self.bad.get(path)
            if w is not None:
                out.append((path, w))
        return out

    def __call__(self):
        with self.lock:
            if self.front:
                b = self.front.popleft()
            else:
                if not self.futures:
                    raise StopIteration
                b = self.futures.popleft().result()
                self._fill_queue()
            b = self.fill(b)
            self.inflight.append(b)
            return b.encoded

    def requeue_inflight(self) -> list[_Batch]:
        """After a pipeline failure: the batches fed but not delivered go back to the front, in order."""
        failed = list(self.inflight)
        self.inflight.clear()
        self.front.extendleft(reversed(failed))
        return failed

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _dali_reason(e: Exception) -> str:
    """The informative line of a DALI error (its first lines are generic)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if ("fail" in low or "error" in low) and "critical error in pipeline" not in low and "operator" not in low:
            return ln
    return lines[-1] if lines else type(e).__name__


def _diagnose(feeder: _Feeder, batches: list[_Batch], gpu: bool, device_id: int | None) -> int:
    """Decode every image of `batches` alone to find those that fail; mark them bad. Returns how many were found."""
    from nvidia.dali import pipeline_def

    # Synchronous and unprefetched, so an error belongs to the image just fed, not to an earlier one.
    @pipeline_def(
        batch_size=1,
        num_threads=1,
        device_id=device_id,
        seed=0,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def decode_only():
        return _decode_graph(gpu)

    found = 0
    pipe = None
    seen: set[str] = set()
    for b in batches:
        for slot, i in enumerate(b.index or b.indices):
            path = feeder.samples[i][0]
            if path in seen or path in feeder.bad:
                continue
            seen.add(path)
            data = b.encoded[slot] if b.encoded is not None else None
            if data is None:
                continue
            if pipe is None:
                pipe = decode_only()
                pipe.build()
            pipe.feed_input("enc", [data])
            try:
                pipe.run()
            except Exception as e:  # DALI raises RuntimeError; the pipeline is unusable afterwards
                feeder.bad[path] = f"decode failed: {_dali_reason(e)}"
                found += 1
                pipe = None
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------------


class DaliTrainLoader(LoaderBase):
    """Training loader on DALI (see the module docstring); build it with `build_train_loader`.

    Args:
        dataset: images in dataset-index order.
        sampler: batch sampler yielding lists of dataset indices (PrototypePairSampler), all of one size.
        aug: augmentation config.
        device: a CUDA device selects nvJPEG (`mixed`) decoding and GPU augmentation; a CPU device, DALI's CPU mode.
        num_workers: DALI threads (and file-reading threads).
        seed: augmentation seed; an epoch's pipeline is seeded from (seed, epoch, rank, first batch position).

    `state_dict()` / `load_state_dict()` carry the pipeline's random state across a mid-epoch stop (one per rank).
    """

    backend = "dali"

    def __init__(
        self,
        dataset: ImageDataset,
        sampler,
        aug: AugmentConfig,
        device: torch.device,
        num_workers: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(dataset, sampler, device, seed)
        why = dali_available()
        if why is not None:
            raise RuntimeError(f"DaliTrainLoader: {why}")
        self.aug = aug
        self.num_threads = max(1, num_workers)
        self.gpu = self.device.type == "cuda"
        self.device_id = _device_id(self.device)
        # The pipeline's maximum batch size: the sampler's, the largest of a list of batches, else the first batch's.
        self.batch_size = int(getattr(sampler, "batch_size", 0)) or None
        if self.batch_size is None and isinstance(sampler, (list, tuple)) and sampler:
            self.batch_size = max(len(b) for b in sampler)
        self._bad: dict[str, str] = {}
        self._live: tuple | None = None  # (pipeline, epoch, batches delivered) while an epoch is being iterated
        self._resume: dict | None = None  # a state_dict() to restore at the next __iter__

    def state_dict(self) -> dict:
        """{"epoch", "position" (batches delivered), "dali" (the pipeline's checkpoint)} while an epoch is being
        iterated and not at its end, else {} (a new epoch starts from its seed)."""
        if self._live is None or self._live[2] >= len(self):
            return {}
        pipe, epoch, position = self._live
        return {"epoch": epoch, "position": position, "dali": pipe.checkpoint()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s random state when the next epoch iterated starts where it was taken."""
        self._resume = dict(state) if state else None

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self._skips.reset()
        epoch, rank = self.epoch, self.rank
        resume, self._resume = self._resume, None
        feeder = _Feeder(self.dataset, positioned(self.sampler), self.num_threads, self._bad)
        batch_size = self.batch_size
        try:
            while True:
                # (Re)build: seeded from the first batch this pipeline will produce, or restored from a checkpoint.
                nxt = feeder.front[0] if feeder.front else (feeder.futures[0].result() if feeder.futures else None)
                if nxt is None:
                    return
                if batch_size is None:
                    batch_size = len(nxt.indices)
                restore = None
                if resume is not None:
                    if (resume["epoch"], resume["position"]) == (epoch, nxt.position):
                        restore = resume["dali"]
                    else:
                        log.warning(
                            "DaliTrainLoader: the saved DALI state is for epoch %d after batch %d, but this epoch %d "
                            "starts at batch %d: augmentations are reseeded, not restored",
                            resume["epoch"],
                            resume["position"],
                            epoch,
                            nxt.position,
                        )
                    resume = None
                pipe = _build(
                    _train_graph,
                    batch_size,
                    self.num_threads,
                    self.device_id,
                    batch_seed(self.seed, epoch, rank, nxt.position),
                    checkpointing=True,
                    checkpoint=restore,
                    source=feeder,
                    aug=self.aug,
                    gpu=self.gpu,
                )
                try:
                    while True:
                        try:
                            outs = pipe.run()
                        except StopIteration:
                            return
                        b = feeder.inflight.popleft()
                        for path, why in feeder.skipped(b):
                            self._skips.add(path, why)
                        views = [_to_torch(o, self.device) for o in outs]
                        index = torch.tensor(b.index, dtype=torch.int64).to(self.device, non_blocking=True)
                        self._delivered(b.position + 1)
                        self._live = (pipe, epoch, b.position + 1)
                        yield views, index
                except RuntimeError as e:
                    failed = feeder.requeue_inflight()
                    if not failed or _diagnose(feeder, failed, self.gpu, self.device_id) == 0:
                        raise
                    log.debug("DaliTrainLoader: rebuilt the pipeline after a decode failure: %s", e)
                finally:
                    self._live = None
                    del pipe
        finally:
            feeder.close()
            self._skips.report(epoch)


class DaliEvalLoader(EvalLoaderBase):
    """The eval loader (`common.EvalLoaderBase`) on DALI: decoding with nvJPEG on a GPU, else on the CPU."""

    backend = "dali"

    def __init__(self, *args, **kwargs) -> None:
        why = dali_available()
        if why is not None:
            raise RuntimeError(f"DaliEvalLoader: {why}")
        super().__init__(*args, **kwargs)
        self.num_threads = max(1, self.num_workers)
        self.gpu = self.device.type == "cuda"
        self.device_id = _device_id(self.device)
        self._bad: dict[str, str] = {}

    def __iter__(self):
        self._skips.reset()
        if not self.indices:  # e.g. more ranks than images: nothing to feed, and DALI wants a first batch
            return
        chunks = list(enumerate(self.batches()))
        feeder = _EvalFeeder(self.dataset, chunks, self.num_threads, self._bad)
        labels_of = [c for _, c in self.dataset.samples]
        try:
            while True:
                pipe = _build(
                    _eval_graph,
                    self.batch_size,
                    self.num_threads,
                    self.device_id,
                    0,
                    source=feeder,
                    image_size=self.image_size,
                    resize_size=self.resize_size,
                    mean=self.mean,
                    std=self.std,
                    gpu=self.gpu,
                )
                try:
                    while True:
                        try:
                            (out,) = pipe.run()
                        except StopIteration:
                            return
                        b = feeder.inflight.popleft()
                        x = _to_torch(out, self.device)
                        bad = [p for p, i in enumerate(b.indices) if feeder.bad_reason(b, p) is not None]
                        for p in bad:
                            self._skips.add(self.dataset.samples[b.indices[p]][0], feeder.bad_reason(b, p))
                        if bad:
                            x[torch.tensor(bad, device=x.device)] = 0.0
                        labels = torch.tensor([labels_of[i] for i in b.indices], dtype=torch.int64)
                        index = torch.tensor(b.indices, dtype=torch.int64)
                        yield x, labels.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)
                except RuntimeError:
                    failed = feeder.requeue_inflight()
                    if not failed or _diagnose(feeder, failed, self.gpu, self.device_id) == 0:
                        raise
                finally:
                    del pipe
        finally:
            feeder.close()
            self._skips.report(None)


class _EvalFeeder(_Feeder):
    """Eval variant: a bad image is replaced by a blank stand-in (zeroed after the pipeline), never by a neighbour,
    because every dataset index needs its own row."""

    _blank: np.ndarray | None = None

    def bad_reason(self, b: _Batch, p: int) -> str | None:
        return b.why[p] or self.bad.get(self.samples[b.indices[p]][0])

    def fill(self, b: _Batch) -> _Batch:
        if _EvalFeeder._blank is None:
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, "PNG")
            _EvalFeeder._blank = np.frombuffer(buf.getvalue(), dtype=np.uint8)
        b.index = list(b.indices)
        b.encoded = [
            self._blank if self.bad_reason(b, p) is not None else np.frombuffer(r, dtype=np.uint8)
            for p, r in enumerate(b.raw)
        ]
        return b
