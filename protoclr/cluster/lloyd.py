"""Lloyd's k-means whose E-step is `protoclr.ops.assign` (SPEC §1, §3.1), single-process or across a process
group, with a seeded k-means++ or random init and faiss's splitting of the largest cluster for empty ones."""

from __future__ import annotations

import logging
import math
import time

import torch

from .. import dist, ops
from ..ops import backend_ext, checks
from .common import broadcast, check_int, fail, progress_bar, use_distributed
from .pca import CHUNK_ELEMS

log = logging.getLogger(__name__)

# Relative perturbation of a split centroid; faiss's EPS (1/1024) in Clustering.cpp.
_SPLIT_EPS = 1.0 / 1024
# Rows per float32 partial sum in the CPU M-step (at least 4·K, so the (K, D) partials stay cheap).
_PARTIAL_ROWS = 65536
# k-means++ draws its seeds from at most this many rows per centroid (faiss samples 256 per centroid too).
_INIT_ROWS_PER_CENTROID = 256


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


def _fused_step(xl: torch.Tensor, backend: str):
    """torch.ops.protoclr.kmeans_step when it computes this E-step: CPU rows whose `ops.assign` backend is the
    C++ one (it shares that kernel's tiled argmax, csrc/cpu/assign_tiles.h); else None."""
    if xl.device.type != "cpu" or ops.resolve(backend, xl.device) is not backend_ext:
        return None
    return getattr(torch.ops.protoclr, "kmeans_step", None)


def _step(xl: torch.Tensor, c: torch.Tensor, k: int, sumsq: torch.Tensor, on: bool, backend: str, fused):
    """One pass over the rows: (idx (n,), the global M-step statistics of `_m_stats`) of the assignment of every
    row to its nearest centroid, x·c_k - ½|c_k|² maximised by `ops.assign` (SPEC 1.4).

    With `fused` (see `_fused_step`) the C++ op adds each row block into its clusters' sums right after the
    block's argmax, so the M-step costs no second read of the rows. Only for finite centroids and bias: on
    non-finite ones `ops.assign` applies its NaN rule (every row to the first such k), which the op does not."""
    cx = c.to(xl.dtype)
    bias = -0.5 * cx.to(checks.stat_dtype(xl.dtype)).pow(2).sum(1)  # (K,) from the centroids assign actually sees
    if fused is not None and xl.size(0) and bool(torch.isfinite(bias).all() & torch.isfinite(cx).all()):
        idx, _, sums, counts = fused(xl, cx, bias)
        buf = torch.cat([sums.view(-1), counts.to(torch.float64), sumsq.view(1)])
        return idx, dist.all_reduce_sum(buf) if on else buf
    idx, _ = ops.assign(xl, cx, bias, backend=backend)
    return idx, _m_stats(xl, idx, k, sumsq, on)


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
    chunk = max(1, CHUNK_ELEMS // xl.size(1))
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


def _local_rows(fn: str, x: torch.Tensor, sharded: bool, on: bool, world: int, rank: int):
    """(N, offset, xl): the global row count and this process's rows xl = global rows [offset, offset + len(xl));
    under a process group, checks that the ranks agree on D (and on N unless sharded)."""
    if on:
        n_dim = torch.zeros(world, 2, dtype=torch.int64, device=x.device)
        n_dim[rank] = torch.tensor([x.size(0), x.size(1)])
        n_dim = dist.all_reduce_sum(n_dim).tolist()
        if any(d != x.size(1) for _, d in n_dim):
            fail(fn, f"x must have the same number of columns D on every rank, got {[d for _, d in n_dim]}")
        if not sharded and any(n != x.size(0) for n, _ in n_dim):
            fail(fn, f"x must be the same (N, D) on every rank unless sharded=True, got N={[n for n, _ in n_dim]}")
        if sharded:
            sizes = [n for n, _ in n_dim]
            return sum(sizes), sum(sizes[:rank]), x
    n_total = x.size(0)
    offset = n_total * rank // world
    return n_total, offset, x[offset : n_total * (rank + 1) // world]


def _init_centroids(init, xl, offset: int, n_total: int, k: int, init_sample: int, seed: int, on: bool, acc):
    """The (k, D) initial centroids in dtype acc (see `kmeans`), the same on every rank."""
    if isinstance(init, torch.Tensor):
        c = init.to(device=xl.device, dtype=acc).clone()
    else:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n_total, generator=gen)
        if init == "random":
            c = _gather_rows(xl, offset, perm[:k], on, acc)
        else:
            c = _kmeans_pp(_gather_rows(xl, offset, perm[:init_sample], on, acc), k, gen)
    if on:
        c = broadcast(c)  # bitwise-identical centroids on every rank, whatever the device's reductions did
    return c


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
    and moves each centroid to the mean of its rows (float64 sums, no float atomics, so a seed gives
    bitwise-identical results for a given thread count: on the CPU with the C++ backend, summed inside the
    E-step's pass by `torch.ops.protoclr.kmeans_step`; else `index_add_` on the CPU, a sorted `segment_reduce`
    on CUDA). Clusters left empty are re-seeded by splitting the largest cluster (faiss), from the counts: no
    pass over the rows. A final E-step makes the returned assignments and inertia those of the returned
    centroids (as scikit-learn does).

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
    checks.check_features(fn, "x", x)
    check_int(fn, "k", k, 1)
    check_int(fn, "iters", iters, 0)
    check_int(fn, "seed", seed, 0)
    if isinstance(init, torch.Tensor):
        if init.shape != (k, x.size(1)) or init.dtype not in checks.FLOAT_DTYPES:
            fail(
                fn,
                f"init must be a float tensor of shape (k, D)=({k}, {x.size(1)}), got {init.dtype} {tuple(init.shape)}",
            )
    elif init not in ("k-means++", "random"):
        fail(fn, f"init must be 'k-means++', 'random' or a (k, D) tensor, got {init!r}")
    on = use_distributed(fn, distributed)
    world, rank = (dist.get_world_size(), dist.get_rank()) if on else (1, 0)
    acc = checks.stat_dtype(x.dtype)
    device = x.device
    t0 = time.perf_counter()

    n_total, offset, xl = _local_rows(fn, x, sharded, on, world, rank)
    if k > n_total:
        fail(fn, f"k must be at most the number of rows N={n_total}, got {k}")
    if init_sample is None:
        init_sample = min(n_total, _INIT_ROWS_PER_CENTROID * k)
    check_int(fn, "init_sample", init_sample, k)
    init_sample = min(init_sample, n_total)

    c = _init_centroids(init, xl, offset, n_total, k, init_sample, seed, on, acc)
    t_init = time.perf_counter() - t0

    # ---- Lloyd iterations
    # Σ|x|² once, accumulated in float64, in chunks (no (n, D) float64 copy of float32 rows).
    sumsq = sum(
        (xs.to(acc).pow(2).sum(dtype=torch.float64) for xs in xl.split(max(1, CHUNK_ELEMS // x.size(1)))),
        torch.zeros((), dtype=torch.float64, device=device),
    )
    fused = _fused_step(xl, backend)
    if fused is not None and not bool(torch.isfinite(sumsq)):
        fused = None  # non-finite rows: ops.assign's NaN rule (see _step)
    n_split = 0
    bar = progress_bar(iters, "k-means", progress)
    for it in range(iters):
        idx, buf = _step(xl, c, k, sumsq, on, backend, fused)  # identical on every rank
        sums, cnt = buf[: k * x.size(1)].view(k, x.size(1)), buf[k * x.size(1) : -1]
        inertia_it = _inertia(buf, c)  # of the assignment just made, before the update
        c_new = (sums / cnt.clamp(min=1)[:, None]).to(acc)
        c = torch.where((cnt > 0)[:, None], c_new, c)
        split = _split_empty(c, cnt.long().tolist())
        n_split += len(split)
        log.debug("k-means iter %d: inertia %.6g, re-seeded %d empty clusters", it, inertia_it, len(split))
        if bar is not None:
            bar.set_postfix(inertia=f"{inertia_it:.5g}", empty=len(split), refresh=False)
            bar.update()
    if bar is not None:
        bar.close()

    # ---- final E-step: assignments and inertia of the returned centroids
    idx, buf = _step(xl, c, k, sumsq, on, backend, fused)
    inertia = _inertia(buf, c)
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
