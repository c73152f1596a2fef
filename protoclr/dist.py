"""Distributed helpers that work with or without an initialised process group (DINO-style).

SPEC §4: rows stay local, columns are gathered *with gradient*, and every normaliser is a global count.
`all_gather_rows` is the gather whose backward sums the column gradients of every rank back onto the rank
that owns the rows; `ddp_loss` turns a rank's share of a global loss into the tensor DDP should
back-propagate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks (a new tensor; no gradient). Identity in a single process."""
    if get_world_size(group) == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def _gather_list(t: torch.Tensor, group) -> list[torch.Tensor]:
    world = get_world_size(group)
    sizes = torch.tensor([t.size(0)], device=t.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    if any(int(s) != t.size(0) for s in all_sizes):
        raise ValueError(
            f"all_gather_rows: every rank must hold the same number of rows, got {[int(s) for s in all_sizes]}; "
            "use a sampler that gives equal per-rank batches (drop_last=True)"
        )
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank = get_rank(group)
        ctx.n = x.size(0)
        return torch.cat(_gather_list(x, group))

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss depends on our rows through its columns: sum the column gradients of all ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def all_gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate x (n, ...) from every rank in rank order, (world·n, ...). Differentiable for floating x:
    the backward sums gradients over ranks. Identity in a single process."""
    if get_world_size(group) == 1:
        return x
    if x.is_floating_point() and x.requires_grad:
        return _AllGatherRows.apply(x, group)
    return torch.cat(_gather_list(x.detach(), group))


def row_offset(n_local: int, group=None) -> int:
    """Global index of this rank's first row when every rank holds n_local rows."""
    return get_rank(group) * n_local


def ddp_loss(local: torch.Tensor, group=None) -> torch.Tensor:
    """For a global loss L = Σ_r L_r whose share on this rank is `local` = L_r: a tensor whose *value* is L
    (the same on every rank, for logging) and whose *gradient* is world·∂L_r, so that DDP's averaging of
    parameter gradients over ranks yields exactly ∂L. Identity in a single process."""
    world = get_world_size(group)
    if world == 1:
        return local
    total = all_reduce_sum(local.detach(), group)
    return local * world + (total - local.detach() * world)
