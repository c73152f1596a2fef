"""Logging and metrics (STYLE "Logging"): stdlib logging, DINO-style meters, metrics.jsonl, metrics.csv,
TensorBoard and a tqdm bar on rank 0.

Files in the output folder (rank 0):
    train.log       everything logged at INFO and above (the same lines as stdout)
    metrics.csv     one row per optimisation step (fixed columns, `STEP_COLUMNS`)
    metrics.jsonl   one JSON line per logged step ({"type": "step", ...}) and per epoch ({"type": "epoch", ...})
    tb/             TensorBoard scalars: train/<metric> per step, epoch/<metric> per epoch
Rows carry `step` = optimisation steps completed. A resumed run drops rows and lines after the step its checkpoint
was written at, so the files read as one run.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import math
import resource
import sys
from collections import deque
from pathlib import Path
from typing import Any

import torch

from . import dist

__all__ = ["Monitor", "MetricLogger", "SmoothedValue", "setup_logging", "format_eta", "memory_gb", "STEP_COLUMNS"]

STEP_COLUMNS = [
    "step",
    "epoch",
    "loss",
    "loss_con",
    "loss_sia",
    "loss_proto",
    "lr",
    "fn_rate",
    "sim_pos",
    "sim_neg",
    "sim_fn",
    "grad_norm",
    "img_per_s",
    "data_share",
    "step_time",
    "mem_gb",
    "time",
]

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
        self._jsonl = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        csv_path = self.out / "metrics.csv"
        _truncate_csv(csv_path, start_step)
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        self._csv_file = open(csv_path, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=STEP_COLUMNS, extrasaction="ignore")
        if new:
            self._csv.writeheader()
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

    def close(self) -> None:
        self._close_bar()
        for f in (self._csv_file, self._jsonl):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._csv_file = self._jsonl = self._tb = None


def _truncate_csv(path: Path, start_step: int) -> None:
    """Keep only rows with step <= start_step (steps done before the checkpoint; a resumed run rewrites the rest)."""
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=STEP_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            try:
                if int(float(r["step"])) <= start_step:
                    w.writerow(r)
            except (KeyError, TypeError, ValueError):
                pass


def _truncate_jsonl(path: Path, start_step: int) -> None:
    if not path.exists():
        return
    if start_step == 0:
        path.unlink()
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
