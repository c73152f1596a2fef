"""Checkpoints: atomic writes, strict loads, `--resume auto`, RNG capture (STYLE §5, "Checkpoints").

A checkpoint is one `torch.save`d dict of plain types and tensors (loadable with `weights_only=True`):
model (the unwrapped module: no DDP `module.` / torch.compile `_orig_mod.` prefixes), optimizer, scheduler,
scaler, prototypes, sampler, rng and loader (per rank; the loader's is the DALI pipeline's random state when saved
mid-epoch), epoch, step, step_in_epoch, config (nested dict) and config_yaml.
`save_training` builds it from the trainer's objects (`TrainingState`) and `restore_training` puts it back.
`checkpoint.pth` in the output folder is always the latest; `checkpoint{epoch:04}.pth` copies are kept on request.
Files are written atomically (`atomic_write`) through `.<name>.<random>.tmp` temporaries that a crash can leave
behind; they are removed after the next successful write of that name and by `remove_stale_temporaries`.
"""

from __future__ import annotations

import glob
import logging
import os
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from . import __version__, dist
from .config import flatten, from_dict, to_dict, to_yaml

__all__ = [
    "KEYS",
    "LATEST",
    "atomic_write",
    "remove_stale_temporaries",
    "find_latest",
    "load",
    "resolve_resume",
    "save",
    "unwrap",
    "clean_state_dict",
    "rng_state",
    "set_rng_state",
    "load_model_state",
    "TrainingState",
    "save_training",
    "resume",
    "restore_training",
]

LATEST = "checkpoint.pth"
# What every reader needs; a file without them is not a protoclr checkpoint (train.py writes all the above).
KEYS = ("model", "config", "epoch", "step")

log = logging.getLogger(__name__)


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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file atomically: `write(f)` fills a temporary file in the same folder, which is flushed, fsync'ed and
    `os.replace`d over `path` (then the folder is fsync'ed), so a crash leaves the old file or the new one, never
    half of one. The file gets the mode of any file the user writes (0o666 less the umask); after the write, stale
    temporaries of this name (left by a killed writer) are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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
    remove_stale_temporaries(path.parent, glob.escape(path.name))
    return path


def _create_temporary(path: Path) -> tuple[int, Path]:
    # Not tempfile.mkstemp: it creates mode 0600; os.open with 0o666 lets the kernel apply the umask, as open() does.
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"atomic_write: no free temporary name next to {str(path)!r}")


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = "checkpoint*.pth") -> int:
    """Remove the `.<name>.<random>.tmp` temporaries of `atomic_write` for the file names matching `pattern` (a glob;
    default: this run's checkpoints) in `folder`; a killed writer leaves one. Returns how many were removed."""
    removed = 0
    for tmp in Path(folder).glob(f".{pattern}.*.tmp"):
        try:
            tmp.unlink()
            removed += 1
        except FileNotFoundError:  # removed by someone else meanwhile
            pass
    if removed:
        log.info("removed %d stale temporary file(s) .%s.*.tmp in %s (an interrupted write)", removed, pattern, folder)
    return removed


def save(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write the checkpoint `state` atomically (`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike, map_location="cpu", keys: Sequence[str] = KEYS) -> dict[str, Any]:
    """Load a checkpoint (tensors and plain types only: `weights_only=True`).

    Args:
        path: the checkpoint file.
        map_location: passed to `torch.load`.
        keys: entries it must have (default: those of a protoclr checkpoint).

    Raises:
        FileNotFoundError / IsADirectoryError: path is missing / a folder (the message names its latest checkpoint).
        ValueError: the file is not a readable checkpoint (truncated, another format, or missing `keys`).
    """
    path = Path(path)
    if path.is_dir():
        latest = find_latest(path)
        hint = f"pass its latest checkpoint file, {str(latest)!r}" if latest else "it holds no checkpoint*.pth"
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as e:  # torch.load raises many types for a file that is not a checkpoint
        first = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0]
        raise ValueError(
            f"checkpoint {str(path)!r} cannot be read: truncated (an interrupted copy?) or not a checkpoint written "
            f"by train.py ({type(e).__name__}: {first})"
        ) from e
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a protoclr checkpoint (train.py writes one): it lacks {missing}"
        )
    return state


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
    """Strict load into the unwrapped model; ValueError (a user error: another model.arch / width / cluster.k)
    listing missing and unexpected keys, or the first parameter whose shape differs."""
    target = unwrap(model)
    state = clean_state_dict(state)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; was it written with another "
            "model.arch / model.width / cluster.k?"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise ValueError(
                f"checkpoint does not match the model: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
            )
    target.load_state_dict(state, strict=True)


# -------------------------------------------------------------------------------------------- training state


@dataclass
class TrainingState:
    """The trainer's objects a checkpoint saves and `--resume` restores (each has state_dict/load_state_dict)."""

    model: nn.Module  # unwrapped: no DDP or torch.compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any  # optim.WarmupCosine
    scaler: torch.amp.GradScaler
    prototypes: Any  # cluster.Prototypes
    sampler: Any  # data.PrototypePairSampler
    loader: Any  # the training loader (a DALI loader has random state mid-epoch)
    bank: Any = None  # cluster.FeatureBank with cluster.features=bank


def save_training(
    out: Path, objs: TrainingState, cfg, epoch: int, step_in_epoch: int, step: int, device: torch.device, sha: str
) -> Path:
    """Write `out`/checkpoint.pth meaning "epoch `epoch`, `step_in_epoch` steps of it done, `step` in all" (at an
    epoch boundary also checkpoint{epoch:04}.pth every cfg.keep_every epochs); returns its path. Every rank joins
    (their RNG and loader states are gathered); rank 0 writes."""
    rngs, loaders = zip(*dist.all_gather_object((rng_state(device), objs.loader.state_dict())))
    # The bank only mid-epoch (at most N·D; a collective): at a boundary the E-step has already used it.
    bank = objs.bank
    bank_state = bank.state_dict() if bank is not None and step_in_epoch and bank.epoch == epoch else None
    path = Path(out) / LATEST
    if dist.is_main_process():
        state = {
            "model": clean_state_dict(unwrap(objs.model).state_dict()),
            "optimizer": objs.optimizer.state_dict(),
            "scheduler": objs.scheduler.state_dict(),
            "scaler": objs.scaler.state_dict(),
            "prototypes": objs.prototypes.state_dict(),
            "bank": bank_state,
            "sampler": objs.sampler.state_dict(),
            "rng": list(rngs),
            "loader": list(loaders),
            "epoch": epoch,
            "step": step,
            "step_in_epoch": step_in_epoch,
            "world_size": dist.get_world_size(),
            "config": to_dict(cfg),
            "config_yaml": to_yaml(cfg),
            "git_sha": sha,
            "version": __version__,
        }
        save(path, state)
        if step_in_epoch == 0 and cfg.keep_every and epoch % cfg.keep_every == 0:
            save(Path(out) / f"checkpoint{epoch:04d}.pth", state)
    dist.barrier()
    return path


def resume(cfg, objs: TrainingState, out: Path, device: torch.device) -> tuple[Path | None, int, int, int]:
    """`--resume` (cfg.resume) for the run in `out`: (checkpoint, epoch, step, step_in_epoch) after restoring `objs`
    from it (`restore_training`), or (None, 0, 0, 0) for a fresh start. Rank 0 picks the file; every rank loads it."""
    path = dist.broadcast_object(resolve_resume(cfg.resume, out) if dist.is_main_process() else None)
    if path is None:
        if cfg.resume == "auto":
            log.info("resume: no checkpoint in %s, starting from scratch", out)
        return None, 0, 0, 0
    epoch, step, step_in_epoch = restore_training(path, objs, cfg, device)
    steps_per_epoch = len(objs.sampler)
    log.info("resume: %s at epoch %d, step %d (%d/%d of the epoch)", path, epoch, step, step_in_epoch, steps_per_epoch)
    return path, epoch, step, step_in_epoch


def restore_training(path: str | os.PathLike, objs: TrainingState, cfg, device: torch.device) -> tuple[int, int, int]:
    """Load the checkpoint `path` into `objs` (the model strictly); returns the (epoch, step, step_in_epoch) it was
    written at. RNG and loader states come back when it holds one per rank of this run, the feature bank when it
    holds that of the epoch being resumed; config keys that differ from the checkpoint's are logged."""
    world, rank = dist.get_world_size(), dist.get_rank()
    state = load(path, map_location="cpu")
    load_model_state(objs.model, state["model"])
    objs.optimizer.load_state_dict(state["optimizer"])
    objs.scheduler.load_state_dict(state["scheduler"])
    objs.scaler.load_state_dict(state["scaler"])
    objs.prototypes.load_state_dict(state["prototypes"])
    objs.sampler.load_state_dict(state["sampler"])
    epoch, step, step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
    if objs.bank is not None and step_in_epoch:
        if (state.get("bank") or {}).get("epoch") == epoch:
            objs.bank.load_state_dict(state["bank"])
        else:
            log.info("resume: no feature bank of epoch %d in the checkpoint; its E-step makes a pass", epoch)
    rngs, loaders = state["rng"], state.get("loader", [])
    if len(rngs) == world:
        set_rng_state(rngs[rank], device)
        if len(loaders) == world:
            objs.loader.load_state_dict(loaders[rank])
    else:
        log.warning(
            "resume: checkpoint has RNG states of %d rank(s), this run has %d; RNGs and augmentation states not "
            "restored",
            len(rngs),
            world,
        )
    _log_config_changes(state["config"], cfg)
    return epoch, step, step_in_epoch


def _log_config_changes(saved: dict, cfg) -> None:
    now, before = flatten(cfg), flatten(from_dict(saved))
    changed = {k: (v, now[k]) for k, v in before.items() if k not in ("resume", "max_steps", "epochs") and now[k] != v}
    if changed:
        log.warning(
            "resume: config differs from the checkpoint's: %s",
            ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
        )


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
