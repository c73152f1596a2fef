"""PCA whitening of the features (SPEC §1 E-step): project on the top eigenvectors of the covariance, scale by
eigenvalue**-0.5, L2-normalise the rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops import checks
from .common import check_int, fail

# Bound on elements of float64 temporaries (row chunks of x) in the covariance and the projection.
CHUNK_ELEMS = 1 << 24
# Eigenvalues below this fraction of the largest are numerically zero: whitening would amplify pure noise.
_EIG_RTOL = 1e-10


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
    rows = max(1, CHUNK_ELEMS // d_in)
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
    checks.check_features(fn, "x", x)
    if x.size(0) < 2:
        fail(fn, f"x must have at least 2 rows to fit a covariance, got shape {tuple(x.shape)}")
    check_int(fn, "dim", dim, 1)
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power):
        fail(fn, f"power must be a finite float (-0.5 whitens, 0 is plain PCA), got {power!r}")
    if cov_dtype not in (torch.float32, torch.float64):
        fail(fn, f"cov_dtype must be torch.float32 or torch.float64, got {cov_dtype}")
    acc = checks.stat_dtype(x.dtype)
    mean, w = _pca_fit(x, dim, float(power), cov_dtype)
    w = w.to(acc)
    # x @ W - mean @ W: no centred (N, D) copy of x, and no float32 copy of half-precision x (row chunks).
    rows = max(1, CHUNK_ELEMS // x.size(1))
    y = torch.cat([xs.to(acc) @ w for xs in x.split(rows)]) - (mean @ w.to(cov_dtype)).to(acc)  # (N, d)
    return F.normalize(y, dim=1)
