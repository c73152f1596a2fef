"""`reference` backend: the executable form of SPEC §1 in plain, dense PyTorch.

Float64-capable and differentiated by autograd; every other backend is tested against it and it is the eager
baseline in `bench/`. It materialises N×Nc similarity (and, chunked, N×Nc×D difference) tensors: fine for
tests and moderate batches, which is exactly why the fused backends exist.

All functions use the row/column form of `csrc/ops.cpp`: rows are this process's anchors, columns the
(possibly all-gathered) batch; row r has global index `row_offset + r`, column c has global index c.
"""

from __future__ import annotations

import torch

from .checks import stat_dtype

# Bound on elements of the N×Nc×D siamese difference tensor materialised at once.
_SIAMESE_CHUNK_ELEMS = 1 << 25
# Bound on elements of the M×K assignment score tile.
_ASSIGN_CHUNK_ELEMS = 1 << 26


def available(device: torch.device) -> str | None:
    return None


def assign(x: torch.Tensor, prototypes: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 1.4: (idx (M,) int64, score (M,) float32|float64); lowest k on ties. Chunked over rows."""
    acc = stat_dtype(x.dtype)
    c = prototypes.to(acc)
    b = bias.to(acc) if bias is not None else None
    rows = max(1, _ASSIGN_CHUNK_ELEMS // max(1, c.size(0)))
    idx, score = [], []
    for xs in x.split(rows):
        s = xs.to(acc) @ c.T  # (m, K)
        if b is not None:
            s = s + b
        i = s.argmax(dim=1)  # first maximal index on ties
        idx.append(i)
        score.append(s.gather(1, i[:, None]).squeeze(1))
    return torch.cat(idx), torch.cat(score)


def _masks(inst, instc, proto, protoc, row_offset):
    gi = row_offset + torch.arange(inst.numel(), device=inst.device)
    gj = torch.arange(instc.numel(), device=inst.device)
    others = gi[:, None] != gj[None, :]  # A(i): j != i
    same_img = inst[:, None] == instc[None, :]
    same_proto = (proto[:, None] >= 0) & (proto[:, None] == protoc[None, :])
    return gi, gj, others, same_img, same_proto


def contrastive(z, zc, inst, instc, proto, protoc, row_offset: int, tau: float, fn_mode: str):
    """SPEC 1.1 building block: (lse (N,), stats (N, 5) = [sum_P c, |P|, sum_F c, |F|, sum_A c])."""
    acc = stat_dtype(z.dtype)
    c = z.to(acc) @ zc.to(acc).T  # (N, Nc) cosine similarities
    _, _, others, same_img, same_proto = _masks(inst, instc, proto, protoc, row_offset)
    pos = others & same_img
    fneg = ~same_img & same_proto
    den = others & ~fneg if fn_mode == "mask" else others
    lse = torch.logsumexp(torch.where(den, c / tau, float("-inf")), dim=1)
    zero = c.new_zeros(())
    stats = torch.stack(
        [
            torch.where(pos, c, zero).sum(1),
            pos.sum(1).to(acc),
            torch.where(fneg, c, zero).sum(1),
            fneg.sum(1).to(acc),
            torch.where(others, c, zero).sum(1),
        ],
        dim=1,
    )
    return lse, stats


def siamese_pair_terms(hi, hj, yij, weight, bias):
    """Per-pair logit d = w·|hi - hj| + b and BCE-with-logits loss softplus(d) - y·d (SPEC 1.2), as
    softplus(±d): exact for every d. (F.softplus returns d itself above its threshold 20, off by up to 2e-9 per
    pair, which cost float64 parity ~1e-10 at |d| > 20.)"""
    acc = stat_dtype(hi.dtype)
    d = (hi.to(acc) - hj.to(acc)).abs() @ weight.reshape(-1).to(acc) + bias.reshape(()).to(acc)
    return torch.logaddexp(torch.where(yij, -d, d), d.new_zeros(()))  # softplus(d) - y·d = softplus((1 - 2y)·d)


def siamese(h, hc, inst, instc, proto, protoc, weight, bias, row_offset: int):
    """SPEC 1.2 dense building block: (loss (N, 2), count (N, 2)) over pairs g_i < g_j, split by y_ij."""
    acc = stat_dtype(h.dtype)
    gi, gj, _, same_img, same_proto = _masks(inst, instc, proto, protoc, row_offset)
    upper = gi[:, None] < gj[None, :]
    y = same_img | same_proto
    rows = max(1, _SIAMESE_CHUNK_ELEMS // max(1, hc.size(0) * h.size(1)))
    losses = []
    for r0 in range(0, h.size(0), rows):
        hr = h[r0 : r0 + rows]
        yr = y[r0 : r0 + rows]
        losses.append(siamese_pair_terms(hr[:, None, :], hc[None, :, :], yr, weight, bias))  # (n, Nc)
    l = torch.cat(losses)  # noqa: E741
    zero = l.new_zeros(())
    neg, posm = upper & ~y, upper & y
    loss = torch.stack([torch.where(neg, l, zero).sum(1), torch.where(posm, l, zero).sum(1)], dim=1)
    count = torch.stack([neg.sum(1), posm.sum(1)], dim=1).to(acc)
    return loss, count


def torch_ops() -> dict:
    """No registered ops: the reference is plain autograd."""
    return {}
