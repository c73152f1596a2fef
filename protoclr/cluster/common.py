"""What the protoclr.cluster modules share: the checks protoclr.ops.checks has no equivalent for, the process
group plumbing and the rank-0 progress bars."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed

from .. import dist


def fail(fn: str, msg: str) -> None:
    raise ValueError(f"{fn}: {msg}")


def check_int(fn: str, name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        fail(fn, f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def use_distributed(fn: str, distributed: bool | None) -> bool:
    """Whether to work across the process group: None = when one is initialised."""
    if distributed is None:
        return dist.is_dist()
    if distributed and not dist.is_dist():
        fail(fn, "distributed=True needs an initialised process group (torch.distributed.init_process_group)")
    return bool(distributed)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    # dist.py has no broadcast; one collective on the default group, like its all_reduce_sum.
    t = t.contiguous()
    torch.distributed.broadcast(t, src=src)
    return t


def _tqdm():
    """tqdm's class, or None when tqdm is not installed (a trainer dependency, not one of `import protoclr`)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def progress_iter(it: Iterable, desc: str, enabled: bool) -> Iterable:
    """tqdm bar over an iterable on rank 0 (STYLE: monitor), or the bare iterable."""
    tqdm = _tqdm() if enabled and dist.get_rank() == 0 else None
    return it if tqdm is None else tqdm(it, desc=desc, leave=False)


def progress_bar(total: int, desc: str, enabled: bool):
    """tqdm bar of `total` steps on rank 0, advanced by the caller's `update()` (a loop that sets a postfix
    each step must count the step itself: tqdm's iterator publishes its count only when it redraws), or None."""
    tqdm = _tqdm() if enabled and dist.get_rank() == 0 else None
    return None if tqdm is None else tqdm(total=total, desc=desc, leave=False)
