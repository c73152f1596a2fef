"""Checkpoints: atomic writes, strict loads, `--resume auto`, RNG capture (STYLE §5, "Checkpoints").

A checkpoint is one `torch.save`d dict of plain types and tensors (loadable with `weights_only=True`):
model (the unwrapped module: no DDP `module.` / torch.compile `_orig_mod.` prefixes), optimizer, scheduler,
scaler, prototypes, sampler, rng and loader (per rank; the loader's is the DALI pipeline's random state when saved
mid-epoch), epoch, step, step_in_epoch, config (nested dict) and config_yaml.
`checkpoint.pth` in the output folder is always the latest; `checkpoint{epoch:04}.pth` copies are kept on request.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "LATEST",
    "find_latest",
    "load",
    "resolve_resume",
    "save",
    "unwrap",
    "clean_state_dict",
    "rng_state",
    "set_rng_state",
    "load_model_state",
]

LATEST = "checkpoint.pth"


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose state_dict has clean names: strips DDP/DataParallel and torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `module.` and `_orig_mod.` name components (state dicts saved from wrapped modules)."""
    out = {}
    for k, v in state.items():
        parts = [p for p in k.split(".") if p not in ("module", "_orig_mod")]
        out[".".join(parts)] = v
    return out


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write `state` atomically: a temp file in the same folder, flushed and fsync'ed, then `os.replace`d over
    `path` (and the folder fsync'ed), so a crash leaves either the old or the new checkpoint, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems do not fsync directories
        pass
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict[str, Any]:
    """Load a checkpoint (tensors and plain types only: `weights_only=True`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def find_latest(out: str | os.PathLike) -> Path | None:
    """The newest checkpoint in `out`: checkpoint.pth, else the highest checkpoint{epoch:04}.pth; None if none."""
    out = Path(out)
    latest = out / LATEST
    if latest.is_file():
        return latest
    numbered = sorted(out.glob("checkpoint[0-9]*.pth"))
    return numbered[-1] if numbered else None


def resolve_resume(resume: str, out: str | os.PathLike) -> Path | None:
    """`--resume` value -> checkpoint path: '' = none; 'auto' = latest in out (None when out has none, i.e. a
    fresh start); anything else is a path that must exist."""
    if not resume:
        return None
    if resume == "auto":
        return find_latest(out)
    path = Path(resume)
    if path.is_dir():
        found = find_latest(path)
        if found is None:
            raise FileNotFoundError(f"--resume {resume!r}: the folder holds no checkpoint*.pth")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint (use --resume auto to continue --out)")
    return path


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load into the unwrapped model, with a message listing missing and unexpected keys."""
    target = unwrap(model)
    state = clean_state_dict(state)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; was it written with another "
            "model.arch / model.width / cluster.k?"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise RuntimeError(
                f"checkpoint does not match the model: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
            )
    target.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------------- RNG


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states (torch CPU, the device's CUDA generator, numpy, python) as checkpointable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _py_state_to_plain(random.getstate()),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    random.setstate(_py_state_from_plain(state["python"]))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _py_state_to_plain(s):
    version, internal, gauss = s
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _py_state_from_plain(d):
    return (d["version"], tuple(d["internal"]), d["gauss"])
