"""Logging and metrics (STYLE "Logging"): stdlib logging, DINO-style meters, metrics.jsonl, metrics.csv,
TensorBoard and a tqdm bar on rank 0.

Files in the output folder (rank 0):
    train.log       everything logged at INFO and above (the same lines as stdout)
    metrics.csv     one row per optimisation step (`step_row`: its keys are the columns)
    metrics.jsonl   one JSON line per logged step ({"type": "step", ...}) and per epoch ({"type": "epoch", ...})
    tb/             TensorBoard scalars: train/<metric> per step, epoch/<metric> per epoch
The trainer hands over a step's tensors (`step_values`, `step_row`) and an epoch's summary; the lines logged for
them are built here (`step_line`, `epoch_line`, `final_line`). Rows carry `step` = optimisation steps completed.
A resumed run drops rows and lines after the step its checkpoint was written at, so the files read as one run.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from . import dist

__all__ = [
    "Monitor",
    "MetricLogger",
    "SmoothedValue",
    "setup_logging",
    "format_eta",
    "memory_gb",
    "step_values",
    "step_row",
    "step_line",
    "epoch_row",
    "epoch_line",
    "final_line",
    "EPOCH_MEANS",
]

# The step values averaged into the epoch summary (over the epoch and the ranks).
EPOCH_MEANS = ("loss", "loss_con", "loss_sia", "loss_proto", "fn_rate", "img_per_s", "data_share", "step_time")

_bar = None  # the active tqdm bar of rank 0 (log lines are written around it)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines through tqdm.write while a bar is active, so bar and lines do not garble each other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if _bar is not None:
                from tqdm.auto import tqdm

                tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + "\n")
            self.flush()
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def setup_logging(out: str | Path | None = None, rank: int | None = None) -> logging.Logger:
    """Configure the `protoclr` logger: rank 0 at INFO to stdout and `out/train.log`; other ranks at WARNING to
    stderr, prefixed with their rank. Idempotent (handlers are replaced)."""
    rank = dist.get_rank() if rank is None else rank
    logger = logging.getLogger("protoclr")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
        h = _TqdmHandler(sys.stdout)
        h.setFormatter(fmt)
        logger.addHandler(h)
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(Path(out) / "train.log")
            fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(fh)
    else:
        logger.setLevel(logging.WARNING)
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(h)
    return logger


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, peak resident set size of the process on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def step_values(
    loss: torch.Tensor, l_proto: torch.Tensor, stats: dict[str, torch.Tensor], grad_norm: torch.Tensor
) -> dict[str, float]:
    """A step's loss terms (`trainer.step_loss`: loss, L_proto and the stats of `ops.spcl_loss`) and gradient norm
    as floats, read from the device in one host sync."""
    on_device = {
        "loss": loss.detach(),
        "loss_con": stats["loss_con"],
        "loss_sia": stats["loss_sia"],
        "loss_proto": l_proto.detach(),
        "fn_rate": stats["fn_rate"],
        "sim_pos": stats["sim_pos"],
        "sim_neg": stats["sim_neg"],
        "sim_fn": stats["sim_fn"],
        "grad_norm": grad_norm,
    }
    return dict(zip(on_device, torch.stack([t.float() for t in on_device.values()]).tolist()))


def step_row(
    step: int, epoch: int, values: dict[str, float], lr: float, images: int, t_data: float, dt: float, device
) -> dict[str, float]:
    """One metrics.csv row; its keys, in this order, are the file's columns. `values` from `step_values`, `images`
    of the global batch, `t_data` seconds of the step's `dt` spent waiting for the batch."""
    v = values
    return {
        "step": step,
        "epoch": epoch,
        "loss": v["loss"],
        "loss_con": v["loss_con"],
        "loss_sia": v["loss_sia"],
        "loss_proto": v["loss_proto"],
        "lr": lr,
        "fn_rate": v["fn_rate"],
        "sim_pos": v["sim_pos"],
        "sim_neg": v["sim_neg"],
        "sim_fn": v["sim_fn"],
        "grad_norm": v["grad_norm"],
        "img_per_s": images / dt,
        "data_share": t_data / dt,
        "step_time": dt,
        "mem_gb": memory_gb(device),
        "time": time.time(),
    }


def epoch_row(
    epoch: int, step: int, knn_top1, seconds: float, skipped: int, sampler_stats: dict, k: int, meters: MetricLogger
) -> dict[str, Any]:
    """An epoch's metrics.jsonl record: kNN top-1 when measured at its end, seconds, unreadable images skipped, the
    sampler's share of same-prototype pairs, the number of prototypes, and the EPOCH_MEANS over the epoch (`meters`,
    averaged over ranks)."""
    return {
        "epoch": epoch,
        "step": step,
        "knn_top1": knn_top1,
        "seconds": seconds,
        "skipped": skipped,
        "same_pair_share": sampler_stats.get("same_share"),
        "prototypes_k": k,
        **meters.global_avg(),
    }


def step_line(row: dict[str, float], meters: MetricLogger, run_steps: int, eta: float) -> str:
    """The log line of a step: its losses, lr, median throughput and mean data share of the recent steps."""
    return (
        f"epoch {row['epoch']} step {row['step']}/{run_steps} | loss {row['loss']:.4f} (con {row['loss_con']:.4f} "
        f"sia {row['loss_sia']:.4f} proto {row['loss_proto']:.4f}) | lr {row['lr']:.4g} | "
        f"{meters.meters['img_per_s'].median:.0f} img/s | data {100 * meters.meters['data_share'].avg:.0f}% | "
        f"fn-rate {row['fn_rate']:.3f} | mem {row['mem_gb']:.2f}G | eta {format_eta(eta)}"
    )


def epoch_line(summary: dict[str, Any], done: bool) -> str:
    """The log line of an epoch's summary (its metrics.jsonl record: the EPOCH_MEANS, knn_top1, skipped, seconds)."""
    avg = summary
    nan = float("nan")
    knn = f" | knn top1 {summary['knn_top1']:.2f}" if summary["knn_top1"] is not None else ""
    return (
        f"epoch {summary['epoch']} {'done' if done else 'stopped'} | step {summary['step']} | "
        f"loss {avg.get('loss', nan):.4f} (con {avg.get('loss_con', nan):.4f} "
        f"sia {avg.get('loss_sia', nan):.4f} proto {avg.get('loss_proto', nan):.4f}) | "
        f"fn-rate {avg.get('fn_rate', nan):.3f}{knn} | "
        f"{avg.get('img_per_s', 0):.0f} img/s | data {100 * avg.get('data_share', 0):.0f}% | "
        f"skipped {summary['skipped']} | {summary['seconds']:.1f}s"
    )


def final_line(top1: float, k: int, t: float, n_val: int, step: int, baselines: dict[str, float]) -> str:
    """The log line of the final kNN monitor, with the no-learning baselines when measured."""
    base = (
        f" | same kNN on raw pixels {baselines['pixels']:.2f}%, on the random-init encoder "
        f"{baselines['random_init']:.2f}%"
        if baselines
        else ""
    )
    return f"final kNN top-1 {top1:.2f}% (k={k}, T={t:g}) on {n_val} held-out images after {step} steps{base}"


class SmoothedValue:
    """A series with a windowed median/average and a global average (DINO's meter)."""

    def __init__(self, window: int = 20) -> None:
        self.deque: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Global average over ranks (the window stays local)."""
        if dist.get_world_size() == 1:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        t = dist.all_reduce_sum(t).cpu()
        self.count, self.total = int(t[0]), float(t[1])

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0


class MetricLogger:
    """Named SmoothedValues; `update(loss=..., lr=...)`, `global_avg()` for the epoch summary."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.meters: dict[str, SmoothedValue] = {}

    def update(self, **values: float) -> None:
        for k, v in values.items():
            self.meters.setdefault(k, SmoothedValue(self.window)).update(float(v))

    def synchronize_between_processes(self) -> None:
        for m in self.meters.values():
            m.synchronize_between_processes()

    def global_avg(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return "  ".join(f"{k}: {m.median:.4g} ({m.global_avg:.4g})" for k, m in self.meters.items())


class Monitor:
    """Per-step and per-epoch outputs of the trainer (rank 0 writes; other ranks only count).

    Args:
        out: output folder. enabled: whether this process writes (rank 0). tensorboard: write tb/ scalars.
        progress: tqdm bar per epoch. start_step: global step the run (re)starts at; later rows are dropped.
    """

    def __init__(
        self, out: str | Path, enabled: bool, tensorboard: bool = True, progress: bool = True, start_step: int = 0
    ) -> None:
        self.out = Path(out)
        self.enabled = enabled
        self.progress = progress and enabled
        self.log = logging.getLogger("protoclr.trainer")
        self._tb = None
        self._csv_file = None
        self._csv = None  # a DictWriter over the first row's keys
        self._jsonl = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        csv_path = self.out / "metrics.csv"
        _truncate_csv(csv_path, start_step)
        self._csv_header = not csv_path.exists() or csv_path.stat().st_size == 0
        self._csv_file = open(csv_path, "a", newline="")
        jsonl_path = self.out / "metrics.jsonl"
        _truncate_jsonl(jsonl_path, start_step)
        self._jsonl = open(jsonl_path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out / "tb"), purge_step=start_step + 1 if start_step else None)
            except Exception as e:  # tensorboard missing or broken: keep training
                self.log.warning("TensorBoard disabled: %s", e)

    # ---- progress bar ----
    def start_epoch(self, epoch: int, total: int, initial: int = 0) -> None:
        global _bar
        if self.progress:
            from tqdm.auto import tqdm

            _bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True)

    def _close_bar(self) -> None:
        global _bar
        if _bar is not None:
            _bar.close()
            _bar = None

    # ---- per step ----
    def step(self, row: dict[str, Any], line: str | None = None) -> None:
        """Record one step: a CSV row and TensorBoard scalars always; a metrics.jsonl line and the log line when
        `line` is given (every `log_every` steps)."""
        if not self.enabled:
            return
        if self._csv is None:
            self._csv = csv.DictWriter(self._csv_file, fieldnames=list(row), extrasaction="ignore")
            if self._csv_header:
                self._csv.writeheader()
        self._csv.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "epoch", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, row["step"])
        if _bar is not None:
            _bar.update(1)
            _bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}", refresh=False)
        if line is not None:
            self._csv_file.flush()
            self._write_json({"type": "step", **row})
            self.log.info(line)

    # ---- per epoch ----
    def epoch(self, summary: dict[str, Any], line: str) -> None:
        self._close_bar()
        if not self.enabled:
            return
        self._write_json({"type": "epoch", **summary})
        if self._tb is not None:
            for k, v in summary.items():
                if k not in ("epoch", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"epoch/{k}", v, summary["epoch"])
            self._tb.flush()
        self._csv_file.flush()
        self.log.info(line)

    def scalar(self, name: str, value: float, step: int) -> None:
        if self._tb is not None and math.isfinite(value):
            self._tb.add_scalar(name, value, step)

    def _write_json(self, obj: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(obj, default=float) + "\n")
        self._jsonl.flush()

    def close(self, final: dict[str, Any] | None = None) -> None:
        """Close the files; `final` (the run's result) becomes the last metrics.jsonl record ({"type": "final"})."""
        self._close_bar()
        if final is not None and self._jsonl is not None:
            self._write_json({"type": "final", **final})
        for f in (self._csv_file, self._jsonl):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._csv_file = self._jsonl = self._tb = None


def _truncate_csv(path: Path, start_step: int) -> None:
    """Keep only rows with step <= start_step (steps done before the checkpoint; a resumed run rewrites the rest)."""
    if _nothing_to_keep(path, start_step):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if not reader.fieldnames:  # an empty file: the next row writes the header
        path.unlink()
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=reader.fieldnames, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            try:
                if int(float(r["step"])) <= start_step:
                    w.writerow(r)
            except (KeyError, TypeError, ValueError):
                pass


def _truncate_jsonl(path: Path, start_step: int) -> None:
    if _nothing_to_keep(path, start_step):
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = obj.get("step", 0)
        if step <= start_step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def _nothing_to_keep(path: Path, start_step: int) -> bool:
    """True when a metrics file keeps no record: there is none, or the run starts afresh (then it is removed)."""
    if path.exists() and start_step == 0:
        path.unlink()
    return not path.exists()
