"""Public ops of protoclr (SPEC §3): prototype assignment and the SPCL losses, with one dispatch table.

Every op validates its input once (`checks.py`), resolves a backend (`resolve`), and calls the backend's
row/column building blocks (`assign`, `contrastive`, `siamese`, see `csrc/ops.cpp` for their contract).
The reductions that turn per-row statistics into losses live here, once, for every backend — including
the distributed case (SPEC §4): pass `group=` (a process group, or `"world"` for the default group) and
the inputs are this rank's rows; columns are gathered with gradient and every normaliser is global.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

import torch

from .. import dist
from . import checks

__all__ = [
    "BACKENDS",
    "assign",
    "contrastive_loss",
    "siamese_loss",
    "spcl_loss",
    "resolve",
    "get_default_backend",
    "set_default_backend",
]

log = logging.getLogger(__name__)

# backend name -> module in this package. A new backend is one module and one entry here.
BACKENDS = {"reference": "backend_reference", "cpu": "backend_ext", "cuda": "backend_ext", "triton": "backend_triton"}
# `auto` on CUDA tensors tries these in order (fastest first, by bench/ on H100/H200).
GPU_ORDER = ["triton", "cuda", "reference"]
_default_backend: str | None = None
_logged_picks: set[tuple[str, str]] = set()


def get_default_backend() -> str:
    """The backend `backend="auto"` stands for as set by `set_default_backend` ("auto": none set)."""
    return _default_backend or "auto"


def set_default_backend(name: str | None) -> None:
    """Backend used by `backend="auto"` (config `loss.backend`); None restores SPEC §3's order.
    The environment variable PROTOCLR_BACKEND has the same effect and is read when no default is set."""
    if name is not None and name != "auto" and name not in BACKENDS:
        raise ValueError(f"set_default_backend: name must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    global _default_backend
    _default_backend = None if name == "auto" else name


def _module(name: str) -> ModuleType:
    return importlib.import_module(f".{BACKENDS[name]}", __name__)


def _device_ok(name: str, device: torch.device) -> str | None:
    # meta tensors (shapes only) run through a backend's fake implementations, or the reference's torch ops
    if name == "cpu" and device.type not in ("cpu", "meta"):
        return f"the cpu backend takes CPU tensors, got {device.type}"
    if name == "cuda" and device.type not in ("cuda", "meta"):
        return f"the cuda backend takes CUDA tensors, got {device.type}"
    return _module(name).available(device)


def resolve(name: str, device: torch.device) -> ModuleType:
    """Backend module for `name` on `device`. An explicit backend that is unusable raises RuntimeError with
    the reason; `auto` takes the default (set_default_backend / PROTOCLR_BACKEND) or SPEC §3's order."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
        why = _device_ok(name, device)
        if why is not None:
            raise RuntimeError(f"backend {name!r} is unavailable: {why}")
        return _module(name)
    preferred = _default_backend or os.environ.get("PROTOCLR_BACKEND") or None
    if preferred == "auto":
        preferred = None
    order = GPU_ORDER if device.type == "cuda" else ["cpu", "reference"]
    if preferred is not None:
        if preferred not in BACKENDS:
            raise ValueError(f"PROTOCLR_BACKEND must be 'auto' or one of {sorted(BACKENDS)}, got {preferred!r}")
        order = [preferred] + [b for b in order if b != preferred]
    reasons = []
    for cand in order:
        why = _device_ok(cand, device)
        if why is None:
            if (cand, device.type) not in _logged_picks:
                _logged_picks.add((cand, device.type))
                log.info("protoclr.ops: backend 'auto' on %s tensors uses %r", device.type, cand)
            return _module(cand)
        reasons.append(f"{cand}: {why}")
    raise RuntimeError(f"no backend is usable on {device.type}: " + "; ".join(reasons))


def _group(group):
    if group is None or not dist.is_dist():
        return None, False
    return (None if group == "world" else group), True


def _columns(group, *rows: torch.Tensor):
    """(columns..., row_offset): the global batch gathered over ranks (with gradient) and this rank's offset."""
    g, on = _group(group)
    if not on:
        return (*rows, 0)
    return (*(dist.all_gather_rows(r, g) for r in rows), dist.row_offset(rows[0].size(0), g))


def _finish(local: torch.Tensor, group) -> torch.Tensor:
    g, on = _group(group)
    return dist.ddp_loss(local, g) if on else local


def _global_sum(t: torch.Tensor, group) -> torch.Tensor:
    g, on = _group(group)
    return dist.all_reduce_sum(t, g) if on else t


def _all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """0-dim bool on the tensors' device: no NaN or ±inf in any of them (no host sync)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def _nan_in_nan_out(*tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SPEC §3 non-finite inputs, one behaviour for every backend, decided on the device: (factor, tensors
    times factor), factor 1, or NaN when any tensor holds a NaN or ±inf. The caller multiplies its loss by the
    factor too: the loss is NaN and so is every element of every gradient, whatever a kernel would make of a
    lone non-finite value (or a degenerate batch whose loss does not depend on the inputs)."""
    factor = torch.where(_all_finite(*tensors), 1.0, float("nan"))
    return factor, [t * factor.to(t.dtype) for t in tensors]


# ---------------------------------------------------------------------------------------------- assign


@torch.no_grad()
def assign(
    x: torch.Tensor, prototypes: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototype assignment, the E-step of k-means (SPEC 1.4).

    Args:
        x: (M, D) float16/bfloat16/float32/float64 rows.
        prototypes: (K, D) centroids, x's dtype and device.
        bias: optional (K,) per-prototype offset; `-0.5 * prototypes.pow(2).sum(1)` gives nearest-centroid in L2.
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Returns:
        idx (M,) int64 = argmax_k x_m·c_k + bias_k, lowest k on ties; score (M,) the maximum, float32
        (float64 for float64 x). No gradient. A non-finite x_m, c_k or bias_k makes every score it enters NaN;
        such a row takes the lowest such k (as torch.max does for NaN), on every backend.

    Raises:
        ValueError: shapes, dtypes or devices that do not match.
    """
    checks.check_assign("assign", x, prototypes, bias)
    if x.size(0) == 0:
        return x.new_empty(0, dtype=torch.int64), x.new_empty(0, dtype=checks.stat_dtype(x.dtype))
    if bias is not None:
        bias = bias.to(checks.stat_dtype(x.dtype))
    idx, score = resolve(backend, x.device).assign(x, prototypes, bias)
    return _assign_non_finite(x, prototypes, bias, idx, score)


def _assign_non_finite(x, prototypes, bias, idx, score):
    """NaN in, NaN out (SPEC §3), the same on every backend, without a host sync: a score that involves a
    non-finite x_m, c_k or bias_k is NaN, and such a row takes the lowest such k (torch.max's rule for NaN)."""
    bad_k = ~torch.isfinite(prototypes).all(1)  # (K,)
    if bias is not None:
        bad_k |= ~torch.isfinite(bias)
    bad_m = ~torch.isfinite(x).all(1)  # (M,): every score of the row
    any_k = bad_k.any()
    first_k = torch.where(bad_m, 0, bad_k.to(torch.uint8).argmax())  # argmax: the first True
    bad = bad_m | any_k
    return torch.where(bad, first_k, idx), torch.where(bad, float("nan"), score)


# ------------------------------------------------------------------------------------------ contrastive


def _contrastive_terms(impl, z, inst, proto, tau, fn_mode, group):
    """(loss, stats rows (N, 5) detached, n_anchors) for this rank's rows; loss already global (SPEC 1.1, §4)."""
    nan_if_bad, (z,) = _nan_in_nan_out(z)
    zc, instc, protoc, offset = _columns(group, z, inst, proto)
    lse, st = impl.contrastive(z, zc, inst, instc, proto, protoc, offset, float(tau), fn_mode)
    if fn_mode == "attract":
        pos_sum, pos_cnt = st[:, 0] + st[:, 2], st[:, 1] + st[:, 3]
    else:
        pos_sum, pos_cnt = st[:, 0], st[:, 1]
    has_pos = pos_cnt > 0
    # Rows without positives contribute 0 (and no gradient); their lse may be -inf.
    rows = torch.where(has_pos, lse - pos_sum / (tau * pos_cnt.clamp(min=1)), torch.zeros_like(lse))
    n_anchors = _global_sum(has_pos.sum().to(lse.dtype), group)
    local = rows.sum() / n_anchors.clamp(min=1) * nan_if_bad.to(lse.dtype)
    return _finish(local, group), st.detach(), zc.size(0)


def contrastive_loss(
    z: torch.Tensor,
    inst: torch.Tensor,
    proto: torch.Tensor,
    *,
    tau: float = 0.5,
    fn_mode: str = "none",
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """Contrastive term L_con of SPCL (SPEC 1.1); NT-Xent for V=2 and fn_mode="none".

    Args:
        z: (N, Dz) L2-normalised projections (any float dtype; accumulation in float32).
        inst: (N,) int64 image id of each row (dataset index; equal for views of one image).
        proto: (N,) int64 prototype id of each row, -1 = unknown.
        tau: temperature, a float in [1e-3, 1e3] (`checks.TAU_RANGE`: fp32 logits c/tau stay accurate there).
        fn_mode: "none" (SimCLR), "mask" (drop false negatives from the denominator) or "attract"
            (false negatives become positives).
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        group: None, or a process group / "world": inputs are this rank's rows of a global batch.

    Returns:
        0-dim float32 (float64 for float64 z) mean over anchors with at least one positive; 0 when no
        anchor has one (degenerate batch; gradients are then zero). A NaN or ±inf in z gives a NaN loss and
        an all-NaN gradient on every backend.

    Raises:
        ValueError: bad shapes, dtypes, devices, N < 2, labels out of range, tau outside
            `checks.TAU_RANGE` (or a bool), unknown fn_mode.
    """
    fn = "contrastive_loss"
    checks.check_batch(fn, z, inst, proto)
    checks.check_tau(fn, tau)
    checks.check_fn_mode(fn, fn_mode)
    return _contrastive_terms(resolve(backend, z.device), z, inst, proto, float(tau), fn_mode, group)[0]


# --------------------------------------------------------------------------------------------- siamese


def _pair_sums(h, inst, proto, weight, bias, pairs, impl, group):
    """(sum of l, count) per class y in {0, 1}, as (2,) tensors, this rank's share (SPEC 1.2)."""
    if pairs is None:
        hc, instc, protoc, offset = _columns(group, h, inst, proto)
        loss, count = impl.siamese(h, hc, inst, instc, proto, protoc, weight, bias, offset)
        return loss.sum(0), count.to(torch.float64).sum(0)
    from .backend_reference import siamese_pair_terms  # listed pairs are O(P·D): one exact torch path

    i_idx, j_idx = pairs
    y = (inst[i_idx] == inst[j_idx]) | ((proto[i_idx] >= 0) & (proto[i_idx] == proto[j_idx]))
    l = siamese_pair_terms(h[i_idx], h[j_idx], y, weight, bias)  # noqa: E741
    cls = torch.stack([~y, y])
    return torch.where(cls, l, l.new_zeros(())).sum(1), cls.sum(1).to(torch.float64)


def _siamese_terms(impl, h, inst, proto, weight, bias, pairs, balance, group):
    acc = checks.stat_dtype(h.dtype)
    nan_if_bad, (h, weight, bias) = _nan_in_nan_out(h, weight.reshape(-1).to(acc), bias.reshape(1).to(acc))
    sums, counts = _pair_sums(h, inst, proto, weight, bias, pairs, impl, group)
    counts = _global_sum(counts, group)
    if balance:
        present = counts > 0
        per_class = sums / counts.clamp(min=1).to(sums.dtype)
        local = per_class.sum() / present.sum().clamp(min=1).to(sums.dtype)
    else:
        local = sums.sum() / counts.sum().clamp(min=1).to(sums.dtype)
    return _finish(local * nan_if_bad.to(local.dtype), group), counts


def siamese_loss(
    h: torch.Tensor,
    inst: torch.Tensor,
    proto: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    balance: bool = True,
    backend: str = "auto",
    group=None,
) -> torch.Tensor:
    """Siamese metric term L_sia of SPCL (SPEC 1.2): BCE on d_ij = Σ_k w_k |h_ik - h_jk| + b.

    Args:
        h: (N, Dh) pooled backbone features (any float dtype).
        inst: (N,) int64 image ids; proto: (N,) int64 prototype ids (-1 = unknown).
        weight: (Dh,) or (1, Dh) head weight; bias: one-element head bias (e.g. nn.Linear(Dh, 1)).
        pairs: None for every unordered pair i < j (dense, fused kernels), or (i_idx, j_idx) int64 row indices
            (exact torch path; under `group` they index the gathered global batch is not supported: pass None).
        balance: mean of the per-class means (y = 0 and y = 1, classes present only) if True, else plain mean.
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        group: None, or a process group / "world" (see module docstring).

    Returns:
        0-dim float32 (float64 for float64 h). Gradients flow to h, weight and bias; sign(0) = 0. A NaN or
        ±inf in h, weight or bias gives a NaN loss and all-NaN gradients on every backend.

    Raises:
        ValueError: bad shapes, dtypes, devices, N < 2, labels or pair indices out of range.
    """
    fn = "siamese_loss"
    checks.check_batch(fn, h, inst, proto, x_name="h")
    checks.check_head(fn, h, weight, bias)
    checks.check_pairs(fn, pairs, h.size(0), h.device)
    if pairs is not None and _group(group)[1]:
        raise ValueError(f"{fn}: pairs must be None under a process group (explicit pairs are per-rank)")
    return _siamese_terms(resolve(backend, h.device), h, inst, proto, weight, bias, pairs, balance, group)[0]


# ------------------------------------------------------------------------------------------------ spcl


def spcl_loss(
    z: torch.Tensor,
    h: torch.Tensor,
    inst: torch.Tensor,
    proto: torch.Tensor | None = None,
    *,
    prototypes: torch.Tensor | None = None,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    tau: float = 0.5,
    fn_mode: str = "none",
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
    balance: bool = True,
    lambda_con: float = 1.0,
    lambda_sia: float = 1.0,
    backend: str = "auto",
    group=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """lambda_con·L_con + lambda_sia·L_sia (SPEC 1.3 without the prototype classifier term).

    Args:
        z: (N, Dz) normalised projections; h: (N, Dh) pooled features; inst: (N,) int64 image ids.
        proto: (N,) int64 prototype ids (-1 unknown); None = all unknown, or assigned from `prototypes`.
        prototypes: optional (K, Dz) centroids in z's space: proto is then `assign(z, prototypes)` (cosine,
            no gradient). Pass proto or prototypes, not both.
        head_weight, head_bias: the siamese head (see `siamese_loss`).
        tau, fn_mode: see `contrastive_loss`; pairs, balance: see `siamese_loss`.
        lambda_con, lambda_sia: weights of the two terms, finite floats.
        backend: "auto", "reference", "cpu", "cuda" or "triton"; group: see the module docstring.

    Returns:
        (loss, stats): loss 0-dim float32; stats detached 0-dim tensors (no host sync): "loss_con",
        "loss_sia", "fn_rate" (share of negatives j, inst_j != inst_i, that share the anchor's prototype),
        "sim_pos", "sim_neg" (true negatives), "sim_fn" (false negatives): mean cosine similarities, NaN-free
        (0 when the set is empty); and "proto" (N,) the prototype ids used.

    Raises:
        ValueError: as `contrastive_loss` and `siamese_loss`, h with other rows than z, lambda_* not finite,
            prototypes that do not match z. A wrong Python type (a list for z) raises `checks.ArgumentTypeError`,
            a TypeError and a ValueError.
    """
    fn = "spcl_loss"
    checks.check_tau(fn, tau)
    checks.check_fn_mode(fn, fn_mode)
    checks.check_weight(fn, "lambda_con", lambda_con)
    checks.check_weight(fn, "lambda_sia", lambda_sia)
    checks.check_features(fn, "z", z, "Dz")
    checks.check_features(fn, "h", h, "Dh")
    if h.size(0) != z.size(0):
        raise ValueError(f"{fn}: h must have z's N={z.size(0)} rows, got {h.size(0)}")
    checks.check_same_device(fn, z=z, h=h)
    if proto is not None and prototypes is not None:
        raise ValueError(f"{fn}: pass proto or prototypes, not both (prototypes assigns proto itself)")
    if prototypes is not None:
        checks.check_assign(fn, z, prototypes, None, x_name="z")
        proto = assign(z.detach(), prototypes, backend=backend)[0]
    elif proto is None and isinstance(inst, torch.Tensor):
        proto = torch.full_like(inst, -1)
    checks.check_batch(fn, z, inst, proto)  # h: same rows, same device (above)
    checks.check_head(fn, h, head_weight, head_bias)
    checks.check_pairs(fn, pairs, h.size(0), h.device)
    if pairs is not None and _group(group)[1]:
        raise ValueError(f"{fn}: pairs must be None under a process group (explicit pairs are per-rank)")

    impl = resolve(backend, z.device)
    l_con, st, n_cols = _contrastive_terms(impl, z, inst, proto, float(tau), fn_mode, group)
    l_sia, _ = _siamese_terms(impl, h, inst, proto, head_weight, head_bias, pairs, balance, group)
    loss = float(lambda_con) * l_con + float(lambda_sia) * l_sia

    # stats: [pos_sum, pos_cnt, fn_sum, fn_cnt, all_sum] summed over rows (and ranks)
    tot = _global_sum(st.to(torch.float64).sum(0), group)
    n_rows = _global_sum(torch.tensor(float(z.size(0)), dtype=torch.float64, device=z.device), group)
    others = n_rows * (n_cols - 1)
    neg_cnt = others - tot[1]
    tn_cnt = neg_cnt - tot[3]

    def ratio(a, b):
        return (a / b.clamp(min=1)).to(torch.float32)

    stats = {
        "loss_con": l_con.detach(),
        "loss_sia": l_sia.detach(),
        "fn_rate": ratio(tot[3], neg_cnt),
        "sim_pos": ratio(tot[0], tot[1]),
        "sim_neg": ratio(tot[4] - tot[0] - tot[2], tn_cnt),
        "sim_fn": ratio(tot[2], tot[3]),
        "proto": proto,
    }
    return loss, stats
