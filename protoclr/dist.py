"""Distributed helpers that work with or without an initialised process group (DINO-style).

SPEC §4: rows stay local, columns are gathered *with gradient*, and every normaliser is a global count.
`all_gather_rows` is the gather whose backward sums the column gradients of every rank back onto the rank
that owns the rows; `ddp_loss` turns a rank's share of a global loss into the tensor DDP should
back-propagate.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from datetime import timedelta

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


# ------------------------------------------------------------------------------------ process group set-up


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank (GPU index on the node), device, and whether a
    process group was initialised (world_size > 1)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _slurm_master_addr() -> str:
    """First host of the SLURM job (MASTER_ADDR for env:// rendezvous): `scontrol show hostnames`, else a plain
    parse of SLURM_JOB_NODELIST (`node[01-04],other` -> `node01`)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or ""
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if m:
        return m.group(1) + re.split(r"[-,]", m.group(2))[0]
    return first


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The torch device for a `--device` value: "auto" (CUDA when available), "cpu", "cuda" (cuda:local_rank) or
    "cuda:N". Raises ValueError (a user error) for another name, or for CUDA on a machine without it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was requested but CUDA is not available; use --device cpu")
        return torch.device("cuda", local_rank if device == "cuda" else torch.device(device).index)
    if device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    return torch.device("cpu")


def init_distributed_mode(device: str = "auto", backend: str | None = None, timeout_min: float = 30.0) -> DistInfo:
    """Initialise torch.distributed from the launcher's environment (DINO-style) and pick this rank's device.

    Launchers, in this order:
      - torchrun (single or multi-node, c10d/static rendezvous): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
      - SLURM (`srun python train.py ...`, one task per GPU): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the
        master is the job's first node, MASTER_PORT defaults to 29500.
      - otherwise a single process (no process group).

    Args:
        device: "auto" (CUDA when available), "cpu" or "cuda" (rank r uses cuda:LOCAL_RANK).
        backend: process-group backend; default NCCL on CUDA, gloo on the CPU.
        timeout_min: collective timeout.

    Returns:
        DistInfo. A group that is already initialised (tests, notebooks) is reused.
    """
    env = os.environ
    if is_dist():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(env.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        dev = resolve_device(device, local)
        return DistInfo(rank, world, local, dev, world > 1)
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    else:
        return DistInfo(0, 1, 0, resolve_device(device, 0), False)
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(
        backend, init_method="env://", rank=rank, world_size=world, timeout=timedelta(minutes=timeout_min), **kwargs
    )
    return DistInfo(rank, world, local, dev, world > 1)


def destroy() -> None:
    """Tear the process group down (end of training)."""
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank; no-op in a single process."""
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (picklable objects; e.g. a resume path)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in a single process."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # Every rank received the sum, so d(loss of all ranks)/dx_r is the sum of every rank's output gradient.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_grad(t: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable sum over ranks (backward: sum of the output gradients of all ranks). Identity alone."""
    if get_world_size(group) == 1:
        return t
    return _AllReduceSum.apply(t, group)


def cpu_threads(requested: int, device: torch.device, num_workers: int, world: int | None = None) -> int:
    """torch intra-op threads for this process: `requested` when > 0; else torch's default with CUDA, and on the CPU
    the cores of this machine divided among its local ranks, minus the data workers that run beside the training
    thread(s). Oversubscribed intra-op threads wait for each other at every op: on a busy 2-core machine a
    2-thread convolution net runs ~10x slower than a 1-thread one."""
    if requested > 0:
        return requested
    if device.type == "cuda":
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world if world is not None else get_world_size()))
    return max(1, cores // max(local_world, 1) - num_workers)
