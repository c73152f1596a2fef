"""Prototypes for SPCL's E-step (SPEC §1, §3.1): index-aligned features, PCA whitening, k-means.

Once per epoch the trainer calls `cluster_dataset`, which chains:

1. `extract_features`: pooled backbone features of every image with the eval transform, written to row
   i = dataset index i (never loader order: the public reference code misaligns labels exactly there).
2. `pca_whiten`: PCA fitted on those features, projected to 256 dims, eigenvalues raised to -0.5, rows
   L2-normalised.
3. `kmeans`: Lloyd iterations whose E-step is `protoclr.ops.assign` with bias -½|c|² (the only place
   argmax-to-centroid logic lives), empty clusters re-seeded by splitting the largest one (as faiss does).
4. `Prototypes.update`: one prototype id per image, kept for the M-step and saved in checkpoints.

`cluster_bank` is the same chain on a `FeatureBank` (cluster.features=bank): the features the training forward
computed during the epoch, index-aligned the same way, instead of step 1's second pass over the data.

Distributed (SPEC §4), when a process group is initialised: each rank encodes its shard of the dataset and
the features are summed back into index order, so every rank holds the same (num_images, D) matrix; k-means
then gives each rank a contiguous block of rows (or takes pre-sharded rows, `sharded=True`) and all-reduces
centroid sums, counts and inertia, so every rank ends with the same centroids and assignments — the same as
one process with the same seed (up to float rounding of the sums, which are accumulated in float64).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping

import torch
import torch.distributed
import torch.nn.functional as F
from torch import nn

from . import dist, ops

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

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Relative perturbation of a split centroid; faiss's EPS (1/1024) in Clustering.cpp.
_SPLIT_EPS = 1.0 / 1024
# Bound on elements of float64 temporaries (row chunks of x) in the M-step and the covariance.
_CHUNK_ELEMS = 1 << 24
# Rows per float32 partial sum in the CPU M-step (at least 4·K, so the (K, D) partials stay cheap).
_PARTIAL_ROWS = 65536
# k-means++ draws its seeds from at most this many rows per centroid (faiss samples 256 per centroid too).
_INIT_ROWS_PER_CENTROID = 256
# Eigenvalues below this fraction of the largest are numerically zero: whitening would amplify pure noise.
_EIG_RTOL = 1e-10


# ------------------------------------------------------------------------------------------- validation


def _fail(fn: str, msg: str) -> None:
    raise ValueError(f"{fn}: {msg}")


def _check_rows(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(fn, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        _fail(fn, f"{name} must be 2-D of shape (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        _fail(fn, f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}; cast with .float()")
    if x.size(1) < 1:
        _fail(fn, f"{name} must have at least one feature column, got shape {tuple(x.shape)}")


def _check_int(fn: str, name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(fn, f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of centroids and statistics: float64 for float64 rows, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _distributed(fn: str, distributed: bool | None) -> bool:
    if distributed is None:
        return dist.is_dist()
    if distributed and not dist.is_dist():
        _fail(fn, "distributed=True needs an initialised process group (torch.distributed.init_process_group)")
    return bool(distributed)


def _broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    # dist.py has no broadcast; one collective on the default group, like its all_reduce_sum.
    t = t.contiguous()
    torch.distributed.broadcast(t, src=src)
    return t


def _progress(it: Iterable, desc: str, enabled: bool) -> Iterable:
    """tqdm bar on rank 0 (STYLE: monitor), or the bare iterable when disabled or tqdm is not installed."""
    if not enabled or dist.get_rank() != 0:
        return it
    try:
        from tqdm.auto import tqdm  # imported lazily: a trainer dependency, not one of `import protoclr`
    except ImportError:
        return it
    return tqdm(it, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------- features


def _unpack_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Mapping):
        if "images" not in batch or "index" not in batch:
            _fail("extract_features", f"a dict batch must hold 'images' and 'index', got keys {sorted(batch)}")
        return batch["images"], batch["index"]
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        _fail(
            "extract_features",
            "loader must yield (images, labels, index) with index the dataset indices, "
            f"got {type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}",
        )
    return batch[0], batch[-1]


def _check_index(index, n_rows: int, num_images: int) -> torch.Tensor:
    fn = "extract_features"
    if not isinstance(index, torch.Tensor):
        _fail(fn, f"index (the loader's last item) must be an int64 tensor of dataset indices, got {type(index)}")
    if index.dtype not in (torch.int64, torch.int32) or index.shape != (n_rows,):
        _fail(
            fn,
            f"index must be int64 of shape (B,)=({n_rows},) like the images, got {index.dtype} {tuple(index.shape)}; "
            "make the dataset return its index as the last item",
        )
    if n_rows:
        lo, hi = int(index.min()), int(index.max())  # loaders yield CPU indices: no device sync
        if lo < 0 or hi >= num_images:
            _fail(fn, f"index must lie in [0, num_images={num_images}), got values in [{lo}, {hi}]")
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
    _check_int(fn, "num_images", num_images, 1)
    on = _distributed(fn, distributed)
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
        bar = _progress(loader, "features", progress)
        for batch in bar:
            images, index = _unpack_batch(batch)
            if not isinstance(images, torch.Tensor):
                _fail(fn, f"images (the loader's first item) must be a tensor, got {type(images).__name__}")
            index = _check_index(index, images.size(0), num_images).to(device, non_blocking=True)
            images = images.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                h = module(images)
            if not isinstance(h, torch.Tensor) or h.dim() != 2 or h.size(0) != images.size(0):
                got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                _fail(fn, f"encoder must map images ({images.size(0)}, ...) to pooled features (B, Dh), got {got}")
            if feats is None:
                feats = torch.zeros(num_images, h.size(1), dtype=torch.float32, device=device)
            elif h.size(1) != feats.size(1):
                _fail(fn, f"encoder output width changed from {feats.size(1)} to {h.size(1)} between batches")
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
            _fail(fn, "loader yielded no batch on any rank")
        if total != (total // ranks) * ranks or (feats is not None and feats.size(1) != total // ranks):
            _fail(fn, "encoder output width Dh differs between ranks")
        if feats is None:
            feats = torch.zeros(num_images, total // ranks, dtype=torch.float32, device=device)
        # Rows are disjoint across ranks (or duplicates averaged): summing restores the full index-ordered matrix.
        feats = dist.all_reduce_sum(feats)
        counts = dist.all_reduce_sum(counts)
    if feats is None:
        _fail(fn, "loader yielded no batch")
    missing = (counts == 0).nonzero().flatten()
    if missing.numel():
        _fail(
            fn,
            f"{missing.numel()} of num_images={num_images} indices were never produced by the loader "
            f"(first: {missing[:8].tolist()}); use a sampler that covers the dataset (drop_last=False)",
        )
    if int(counts.max()) > 1:
        feats /= counts[:, None].to(feats.dtype)
    log.info("extract_features: %d images x %d dims in %.1fs", num_images, feats.size(1), time.perf_counter() - t0)
    return feats


# ------------------------------------------------------------------------------------------------- PCA


def _pca_fit(x: torch.Tensor, dim: int, power: float, cov_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), projection W (D, d)) with d = min(dim, D) such that (x - mean) @ W is PCA-whitened.

    Columns of W are eigenvectors of the covariance (largest eigenvalue first, sign fixed so that each
    eigenvector's largest-magnitude entry is positive: eigh's sign is arbitrary and would differ across devices)
    scaled by eigenvalue**power. Directions with a numerically zero eigenvalue (rank-deficient data: N <= D,
    constant features) get a zero column instead of an amplified noise column.
    """
    n, d_in = x.shape
    mean = x.sum(0, dtype=cov_dtype) / n  # (D,)
    cov = x.new_zeros(d_in, d_in, dtype=cov_dtype)
    rows = max(1, _CHUNK_ELEMS // d_in)
    for xs in x.split(rows):
        xc = xs.to(cov_dtype) - mean  # centring per chunk: no (N, D) temporary and no cancellation
        cov.addmm_(xc.T, xc)
    cov /= max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    d = min(dim, d_in)
    evals, evecs = evals.flip(0)[:d], evecs.flip(1)[:, :d]  # (d,), (D, d)
    pivot = evecs.abs().argmax(0)
    evecs = evecs * torch.sign(evecs.gather(0, pivot[None]))  # deterministic signs
    keep = evals > _EIG_RTOL * evals[0].clamp(min=torch.finfo(cov_dtype).tiny)
    scale = torch.where(keep, evals.clamp(min=torch.finfo(cov_dtype).tiny).pow(power), torch.zeros_like(evals))
    return mean, evecs * scale


@torch.no_grad()
def pca_whiten(
    x: torch.Tensor, dim: int = 256, power: float = -0.5, *, cov_dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """PCA-whiten rows and L2-normalise them (SPEC §1 E-step).

    Fits the mean and covariance on x (covariance accumulated in `cov_dtype` over row chunks, so no float64
    copy of x), eigendecomposes it with `torch.linalg.eigh`, projects on the top `dim` eigenvectors, scales
    component j by eigenvalue_j**power and L2-normalises each row.

    Args:
        x: (N, D) features (float16/bfloat16/float32/float64), N >= 2.
        dim: output dimension; `dim > D` gives D columns. Components whose eigenvalue is numerically zero
            (N <= D, constant features) come out as zero columns, so the width is always min(dim, D).
        power: exponent on the eigenvalues: -0.5 whitens, 0 is plain PCA.
        cov_dtype: torch.float64 (default) or torch.float32 for the covariance and eigendecomposition.

    Returns:
        (N, min(dim, D)) float32 (float64 for float64 x) rows of unit L2 norm (a row that projects to 0 stays 0).

    Raises:
        ValueError: x not a 2-D float tensor with N >= 2 rows, dim < 1, non-finite power, bad cov_dtype.
    """
    fn = "pca_whiten"
    _check_rows(fn, "x", x)
    if x.size(0) < 2:
        _fail(fn, f"x must have at least 2 rows to fit a covariance, got shape {tuple(x.shape)}")
    _check_int(fn, "dim", dim, 1)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        _fail(fn, f"power must be a finite float (-0.5 whitens, 0 is plain PCA), got {power!r}")
    if cov_dtype not in (torch.float32, torch.float64):
        _fail(fn, f"cov_dtype must be torch.float32 or torch.float64, got {cov_dtype}")
    acc = _acc_dtype(x.dtype)
    mean, w = _pca_fit(x, dim, float(power), cov_dtype)
    w = w.to(acc)
    # x @ W - mean @ W: no centred (N, D) copy of x, and no float32 copy of half-precision x (row chunks).
    rows = max(1, _CHUNK_ELEMS // x.size(1))
    y = torch.cat([xs.to(acc) @ w for xs in x.split(rows)]) - (mean @ w.to(cov_dtype)).to(acc)  # (N, d)
    return F.normalize(y, dim=1)


# ---------------------------------------------------------------------------------------------- k-means


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


def _gather_rows(xl: torch.Tensor, offset: int, idx: torch.Tensor, on: bool, acc: torch.dtype) -> torch.Tensor:
    """Rows at global indices idx (S,) of the row-sharded matrix, identical on every rank, (S, D) in acc.

    Each rank fills the rows it owns and zeros elsewhere; the sum over ranks is then exact (x + 0 = x)."""
    idx = idx.to(xl.device)
    if not on:
        return xl[idx - offset].to(acc)
    out = xl.new_zeros(idx.numel(), xl.size(1), dtype=acc)
    mine = ((idx >= offset) & (idx < offset + xl.size(0))).nonzero().flatten()
    out[mine] = xl[idx[mine] - offset].to(acc)
    return dist.all_reduce_sum(out)


def _kmeans_pp(pool: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii; sklearn's 2 + ln k local trials) on pool (S, D), which is
    already a seeded random permutation of rows, so its first row is the uniformly drawn first seed.
    All uniforms come from the CPU generator up front: the loop runs on the device without host syncs."""
    s = pool.size(0)
    trials = 2 + int(math.log(k))
    u = torch.rand(k, trials, generator=gen, dtype=torch.float64).to(pool.device)  # (k, T)
    sq = pool.pow(2).sum(1)  # (S,)
    chosen = torch.empty(k, dtype=torch.int64, device=pool.device)
    chosen[0] = 0
    closest = (sq + sq[0] - 2 * pool @ pool[0]).clamp_(min=0)  # (S,) squared distance to the nearest seed
    for i in range(1, k):
        cum = torch.cumsum(closest.to(torch.float64), 0)
        cand = torch.searchsorted(cum, u[i] * cum[-1], right=True).clamp_(max=s - 1)  # (T,) ∝ D(x)²
        d = (sq[:, None] + sq[cand][None, :] - 2 * pool @ pool[cand].T).clamp_(min=0)  # (S, T)
        d = torch.minimum(d, closest[:, None])
        best = d.sum(0, dtype=torch.float64).argmin()  # candidate with the lowest potential
        closest = d.gather(1, best.view(1, 1).expand(s, 1)).squeeze(1)
        chosen[i] = cand[best]
    return pool[chosen]


def _split_empty(c: torch.Tensor, counts: list[int]) -> list[tuple[int, int]]:
    """Re-seed each empty cluster in place by splitting the currently largest one, as faiss does: the empty
    centroid becomes a copy of the largest perturbed by (1 + eps·s), the largest by (1 - eps·s), s = ±1
    alternating over dimensions; their counts share the largest's count so the next empty cluster splits the
    next largest. Deterministic (lowest id on ties), so every rank makes the same choice. Returns the
    (empty, split) pairs; a cluster of fewer than 2 rows is never split."""
    sign = torch.ones(c.size(1), dtype=c.dtype, device=c.device)
    sign[1::2] = -1
    done = []
    for j in [i for i, n in enumerate(counts) if n == 0]:
        big = max(range(len(counts)), key=lambda i: (counts[i], -i))
        if counts[big] < 2:
            break
        c[j] = c[big] * (1 + _SPLIT_EPS * sign)
        c[big] = c[big] * (1 - _SPLIT_EPS * sign)
        counts[j] = counts[big] // 2
        counts[big] -= counts[j]
        done.append((j, big))
    return done


def _e_step(xl: torch.Tensor, c: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx (n,), score (n,)) of x·c_k - ½|c_k|² maximised: nearest centroid in L2 via ops.assign (SPEC 1.4)."""
    cx = c.to(xl.dtype)
    bias = -0.5 * cx.to(_acc_dtype(xl.dtype)).pow(2).sum(1)  # (K,) from the centroids assign actually sees
    return ops.assign(xl, cx, bias, backend=backend)


def _m_stats(
    xl: torch.Tensor, idx: torch.Tensor, k: int, sumsq: torch.Tensor, on: bool, sorted_sums: bool | None = None
) -> torch.Tensor:
    """Global M-step statistics of assignments idx (n,) as one float64 buffer [sums (K·D), counts (K), Σ|x|²],
    all-reduced in one collective when distributed.

    Sums are float64 so that they hardly depend on how rows are grouped (one process vs shards) and are
    bitwise deterministic:
    - CPU (default): index_add_, which adds rows in order. Float32 rows are summed in float32 per chunk of
      rows and the chunk sums accumulated in float64, because converting every row to float64 costs ~8x the
      float32 index_add_ on a memory-bound CPU.
    - CUDA (`sorted_sums`): index_add_ would use atomics, whose order varies from run to run; instead rows are
      sorted by cluster (stable) and reduced per segment with `segment_reduce`, which sums in a fixed order.
    """
    k_d = k * xl.size(1)
    buf = torch.zeros(k_d + k + 1, dtype=torch.float64, device=xl.device)
    sums = buf[:k_d].view(k, xl.size(1))
    if sorted_sums is None:
        sorted_sums = xl.device.type != "cpu"
    chunk = max(1, _CHUNK_ELEMS // xl.size(1))
    if sorted_sums:
        order = torch.argsort(idx, stable=True)
        a_sorted = idx[order]
        for o, a in zip(order.split(chunk), a_sorted.split(chunk)):
            lengths = torch.bincount(a, minlength=k)  # (K,) segment lengths of this sorted chunk
            # unsafe=True skips a validation that would sync with the host; lengths sum to the chunk's rows.
            sums += torch.segment_reduce(xl[o].to(torch.float64), "sum", lengths=lengths, axis=0, unsafe=True)
    elif xl.dtype == torch.float64:
        for xs, a in zip(xl.split(chunk), idx.split(chunk)):
            sums.index_add_(0, a, xs)
    else:
        rows = max(_PARTIAL_ROWS, 4 * k)
        for xs, a in zip(xl.split(rows), idx.split(rows)):
            sums += torch.zeros(k, xl.size(1), dtype=torch.float32, device=xl.device).index_add_(0, a, xs.float())
    buf[k_d:-1] = torch.bincount(idx, minlength=k).to(torch.float64)
    buf[-1] = sumsq
    return dist.all_reduce_sum(buf) if on else buf


def _inertia(buf: torch.Tensor, c: torch.Tensor) -> float:
    """Σ_rows |x - c_a|² = Σ|x|² - 2 Σ_k c_k·S_k + Σ_k n_k |c_k|² from the M-step statistics of the
    assignment a (sums S_k and counts n_k in float64): O(K·D) instead of another pass over the rows."""
    k, d = c.shape
    c64 = c.to(torch.float64)
    sums, cnt = buf[: k * d].view(k, d), buf[k * d : -1]
    return max(float(buf[-1] - 2 * (c64 * sums).sum() + (cnt * c64.pow(2).sum(1)).sum()), 0.0)


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    backend: str = "auto",
    init: str | torch.Tensor = "k-means++",
    init_sample: int | None = None,
    sharded: bool = False,
    distributed: bool | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means with `ops.assign` as the E-step (SPEC §3.1).

    Each of the `iters` iterations assigns every row to its nearest centroid (`ops.assign` with bias -½|c|²)
    and moves each centroid to the mean of its rows (float64 sums — `index_add_` on the CPU, a sorted
    `segment_reduce` on CUDA, neither uses float atomics, so a seed gives bitwise-identical results — and
    `bincount` counts). Clusters left empty are re-seeded by splitting the largest cluster (faiss). A final
    E-step makes the returned assignments and inertia those of the returned centroids (as scikit-learn does).

    Init (seeded by `seed` only, via a CPU generator, so it is the same on every device and world size):
    a seeded permutation of the global row indices is drawn; "random" takes its first k rows, "k-means++"
    runs greedy k-means++ on its first `init_sample` rows. Under a process group those rows are gathered from
    the ranks that own them (each rank contributes its rows, zeros elsewhere, one all-reduce), k-means++ runs
    on every rank on the same rows and rank 0's result is broadcast, so the init equals the single-process one.

    Distributed (a process group is initialised, or distributed=True): with sharded=False every rank passes
    the same x (as `extract_features` returns it) and works on a contiguous block of N/P rows; with
    sharded=True x is this rank's rows (the global order is rank order; sizes may differ). Centroid sums,
    counts and inertia are all-reduced in one float64 collective per iteration, so every rank computes the same
    centroids, and the result equals one process with the same seed up to float64 rounding of the sums.

    Args:
        x: (N, D) rows (float16/bfloat16/float32/float64); L2-normalised whitened features in SPCL, any rows work.
        k: number of clusters, 1 <= k <= N (global N when distributed).
        iters: Lloyd iterations (E-step + M-step), >= 0.
        seed: seed of the init.
        backend: backend of `ops.assign`: "auto", "reference", "cpu", "cuda" or "triton".
        init: "k-means++" (default), "random", or a (k, D) tensor of initial centroids (same on every rank).
        init_sample: rows k-means++ seeds from; default min(N, 256·k) (faiss's points per centroid).
        sharded: x holds only this rank's rows (see above); ignored in a single process.
        distributed: None = when a process group is initialised; False = this process only.
        progress: tqdm bar over iterations on rank 0.

    Returns:
        (centroids, assignments, inertia): centroids (k, D) float32 (float64 for float64 x); assignments
        (N,) int64 nearest-centroid ids of the rows of x (global N rows with sharded=False, this rank's rows
        with sharded=True); inertia = Σ_rows |x - c_assignment|² over all rows (all ranks), a Python float.

    Raises:
        ValueError: x not a 2-D float tensor, k outside [1, N], iters < 0, unknown init, a bad init tensor,
            init_sample < k, ranks that disagree on D (or on N with sharded=False).
    """
    fn = "kmeans"
    _check_rows(fn, "x", x)
    _check_int(fn, "k", k, 1)
    _check_int(fn, "iters", iters, 0)
    _check_int(fn, "seed", seed, 0)
    if isinstance(init, torch.Tensor):
        if init.shape != (k, x.size(1)) or init.dtype not in _FLOAT_DTYPES:
            _fail(
                fn,
                f"init must be a float tensor of shape (k, D)=({k}, {x.size(1)}), got {init.dtype} {tuple(init.shape)}",
            )
    elif init not in ("k-means++", "random"):
        _fail(fn, f"init must be 'k-means++', 'random' or a (k, D) tensor, got {init!r}")
    on = _distributed(fn, distributed)
    world, rank = (dist.get_world_size(), dist.get_rank()) if on else (1, 0)
    acc = _acc_dtype(x.dtype)
    device = x.device
    t0 = time.perf_counter()

    # ---- rows of this process: xl = global rows [offset, offset + n_local)
    if on:
        n_dim = torch.zeros(world, 2, dtype=torch.int64, device=device)
        n_dim[rank] = torch.tensor([x.size(0), x.size(1)])
        n_dim = dist.all_reduce_sum(n_dim).tolist()
        if any(d != x.size(1) for _, d in n_dim):
            _fail(fn, f"x must have the same number of columns D on every rank, got {[d for _, d in n_dim]}")
        if not sharded and any(n != x.size(0) for n, _ in n_dim):
            _fail(fn, f"x must be the same (N, D) on every rank unless sharded=True, got N={[n for n, _ in n_dim]}")
    if on and sharded:
        sizes = [n for n, _ in n_dim]
        n_total, offset, xl = sum(sizes), sum(sizes[:rank]), x
    else:
        n_total = x.size(0)
        offset = n_total * rank // world
        xl = x[offset : n_total * (rank + 1) // world]
    if k > n_total:
        _fail(fn, f"k must be at most the number of rows N={n_total}, got {k}")
    if init_sample is None:
        init_sample = min(n_total, _INIT_ROWS_PER_CENTROID * k)
    _check_int(fn, "init_sample", init_sample, k)
    init_sample = min(init_sample, n_total)

    # ---- init
    if isinstance(init, torch.Tensor):
        c = init.to(device=device, dtype=acc).clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n_total, generator=gen)
        if init == "random":
            c = _gather_rows(xl, offset, perm[:k], on, acc)
        else:
            c = _kmeans_pp(_gather_rows(xl, offset, perm[:init_sample], on, acc), k, gen)
    if on:
        c = _broadcast(c)  # bitwise-identical centroids on every rank, whatever the device's reductions did
    t_init = time.perf_counter() - t0

    # ---- Lloyd iterations
    # Σ|x|² once, accumulated in float64, in chunks (no (n, D) float64 copy of float32 rows).
    sumsq = sum(
        (xs.to(acc).pow(2).sum(dtype=torch.float64) for xs in xl.split(max(1, _CHUNK_ELEMS // x.size(1)))),
        torch.zeros((), dtype=torch.float64, device=device),
    )
    n_split = 0
    bar = _progress(range(iters), "k-means", progress)
    for it in bar:
        idx, _ = _e_step(xl, c, backend)
        buf = _m_stats(xl, idx, k, sumsq, on)  # identical on every rank
        sums, cnt = buf[: k * x.size(1)].view(k, x.size(1)), buf[k * x.size(1) : -1]
        inertia_it = _inertia(buf, c)  # of the assignment just made, before the update
        c_new = (sums / cnt.clamp(min=1)[:, None]).to(acc)
        c = torch.where((cnt > 0)[:, None], c_new, c)
        split = _split_empty(c, cnt.long().tolist())
        n_split += len(split)
        log.debug("k-means iter %d: inertia %.6g, re-seeded %d empty clusters", it, inertia_it, len(split))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(inertia=f"{inertia_it:.5g}", empty=len(split))

    # ---- final E-step: assignments and inertia of the returned centroids
    idx, _ = _e_step(xl, c, backend)
    inertia = _inertia(_m_stats(xl, idx, k, sumsq, on), c)
    if on and not sharded:
        full = torch.zeros(n_total, dtype=torch.int64, device=device)
        full[offset : offset + idx.numel()] = idx
        idx = dist.all_reduce_sum(full)
    log.debug(
        "k-means: N=%d D=%d k=%d iters=%d inertia %.6g, %d empty clusters re-seeded, init %.2fs, total %.2fs",
        n_total,
        x.size(1),
        k,
        iters,
        inertia,
        n_split,
        t_init,
        time.perf_counter() - t0,
    )
    return c, idx, inertia


# ------------------------------------------------------------------------------------------- Prototypes


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
        _check_int("Prototypes", "num_images", num_images, 1)
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
            _fail(fn, f"ids must be int64 of shape (num_images,)=({self.num_images},), got {got}")
        if centroids is not None:
            _check_rows(fn, "centroids", centroids)
        k = centroids.size(0) if centroids is not None else 0
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < -1 or hi >= k:
                _fail(fn, f"ids must lie in [-1, K={k}) (K = rows of centroids), got values in [{lo}, {hi}]")

    def update(self, ids: torch.Tensor, centroids: torch.Tensor, epoch: int, inertia: float | None = None) -> None:
        """Store a clustering: ids (num_images,) int64 in [0, K) (kept on their device), centroids (K, D)."""
        fn = "Prototypes.update"
        self._check(fn, ids, centroids)
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            _fail(fn, f"epoch must be an int, got {epoch!r}")
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
            _fail(fn, f"state must hold exactly the keys {sorted(self._KEYS)}, got {got}")
        ids, centroids = state["ids"], state["centroids"]
        if isinstance(ids, torch.Tensor) and ids.shape != (self.num_images,):
            _fail(fn, f"ids has {ids.numel()} entries but num_images={self.num_images}: the dataset changed size")
        self._check(fn, ids, centroids)
        device = self.ids.device
        self.ids = ids.to(device)
        self.centroids = None if centroids is None else centroids.to(device)
        self.epoch = int(state["epoch"])
        self.inertia = None if state["inertia"] is None else float(state["inertia"])
        self.stats = cluster_stats(self.ids, self.k) if self.centroids is not None else {}


# ------------------------------------------------------------------------------------------ FeatureBank


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
        _check_int("FeatureBank", "num_images", num_images, 1)
        _check_int("FeatureBank", "dim", dim, 1)
        if dtype not in _FLOAT_DTYPES:
            _fail("FeatureBank", f"dtype must be float16, bfloat16, float32 or float64, got {dtype}")
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
            _fail("FeatureBank.add", f"h must be (V·B, D) with B={b} (index) and D={d}, got {tuple(h.shape)}")
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
            _fail(fn, f"state must hold exactly the keys {sorted(keys)}, got {got}")
        index, feats = state["index"], state["feats"]
        if index.numel() and int(index.max()) >= self.num_images:
            _fail(fn, f"index reaches {int(index.max())} but num_images={self.num_images}: the dataset changed size")
        if feats.shape != (index.numel(), self.feats.size(1)):
            _fail(fn, f"feats must be ({index.numel()}, {self.feats.size(1)}), got {tuple(feats.shape)}")
        self.reset(int(state["epoch"]))
        if dist.get_rank() == 0:
            index = index.to(self.feats.device)
            self.feats[index] = feats.to(self.feats)
            self.counts[index] = state["counts"].to(self.counts)


# ---------------------------------------------------------------------------------------------- pipeline


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
) -> Prototypes:
    """The SPEC §1 E-step: extract_features -> pca_whiten -> kmeans -> Prototypes.update, logged.

    Args:
        encoder, loader, num_images, device: see `extract_features` (loader with the eval transform).
        k: number of prototypes K; pca_dim, power: see `pca_whiten`; iters, seed, backend: see `kmeans`.
        epoch: recorded in the prototypes (the epoch about to use them).
        prototypes: updated in place; None creates `Prototypes(num_images)` on `device`.
        progress: tqdm bars on rank 0.

    Returns:
        The updated prototypes: ids (num_images,) int64 on `device`, identical on every rank.
    """
    t0 = time.perf_counter()
    feats = extract_features(encoder, loader, num_images, device, progress=progress)
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
        _fail("cluster_dataset", f"prototypes hold {prototypes.num_images} images but num_images={num_images}")
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
