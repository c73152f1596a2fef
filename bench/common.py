"""Shared benchmark machinery (STYLE "Benchmarks"): timing, peak extra memory, SPEC §5 FLOP models, the
environment record and the JSON-lines writer, the bf16 matmul-rate probe, and the one baseline bench/ writes
itself (`cdist_siamese_baseline`). Everything else a benchmark measures comes from the package.

Timing: on the GPU `triton.testing.do_bench` (median, with its L2 flush) for calls that take milliseconds,
CUDA events around a few calls for slow ones; on the CPU `time.perf_counter` around many calls, median.
Memory: on the GPU `torch.cuda.max_memory_allocated` minus the allocation before the call; on the CPU the
growth of the resident set during the call (VmHWM after resetting it via /proc/self/clear_refs, in a worker
subprocess, with glibc malloc set to release freed memory so that nothing resident is silently reused) — CPU
allocations are not tracked by torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SCHEMA = 1

# ------------------------------------------------------------------------------------------ FLOP models


def flops(op: str, mode: str, n: int, d: int, k: int | None = None) -> float:
    """SPEC §5 FLOP model. op: contrastive|siamese|assign; mode: fwd|fwd_bwd; n rows (M for assign)."""
    if op == "contrastive":
        return (2.0 if mode == "fwd" else 8.0) * n * n * d
    if op == "siamese":  # dense, every pair; non-tensor-core work
        return (1.5 if mode == "fwd" else 4.5) * n * n * d
    if op == "assign":
        return 2.0 * n * (k or 0) * d
    raise ValueError(f"flops: unknown op {op!r}")


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(ms: list[float]) -> dict:
    ms = sorted(ms)

    def q(p: float) -> float:
        return ms[min(len(ms) - 1, max(0, round(p * (len(ms) - 1))))]

    return {"median_ms": statistics.median(ms), "p20_ms": q(0.2), "p80_ms": q(0.8), "reps": len(ms)}


def time_cpu(
    fn: Callable[[], object], *, budget_s: float = 2.0, min_reps: int = 5, max_reps: int = 200, prior_ms=()
) -> dict:
    """Median wall time of `fn()` over repeated calls (the caller has already warmed it up).

    Repeats until `budget_s` is spent and enough calls are done (`min_reps`; 3 when a call takes over a
    second, 2 over five seconds: the slow dense baselines), or `max_reps` calls. `prior_ms`: samples already
    taken (the memory-measuring call of a slow case). Returns median_ms, p20_ms, p80_ms, reps.
    """
    ms: list[float] = list(prior_ms)
    start = time.perf_counter()
    while len(ms) < max_reps:
        if ms:
            need = 2 if ms[0] > 5000 else 3 if ms[0] > 1000 else min_reps
            if len(ms) >= need and time.perf_counter() - start >= budget_s:
                break
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ms)


def time_gpu(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100, slow_ms: float = 20) -> dict:
    """Median GPU time of `fn()` (already warmed up): do_bench for fast calls, CUDA events for slow ones.

    A call estimated above `slow_ms` is timed over max(3, rep_ms / call) calls with CUDA events instead
    of do_bench, whose own warm-up estimate alone would run it five times.
    """
    dev = torch.device("cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    _sync(dev)
    first = start.elapsed_time(end)
    if first <= slow_ms:
        try:
            import triton.testing

            q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
            reps = max(1, int(rep_ms / max(first, 1e-3)))
            return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "reps": reps}
        except ImportError:
            pass
    ms = []
    for _ in range(max(3, min(100, int(rep_ms / max(first, 1e-3))))):
        start.record()
        fn()
        end.record()
        _sync(dev)
        ms.append(start.elapsed_time(end))
    return _quantiles(ms)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds for one synchronised call (warm-up, probes)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- memory


def _proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def _exact_rss():
    """glibc malloc made to track live memory: free pages released first (malloc_trim), then every block of
    64 KiB or more mmap-ed and unmapped on free, so a call cannot reuse memory that is already resident (the
    warm-up's) without it counting. Afterwards a fixed 32 MiB threshold (glibc's dynamic maximum) for the timing
    calls. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 << 10)
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def peak_extra_cpu(fn: Callable[[], object]) -> tuple[int, str, float]:
    """(bytes, method, ms): resident-set growth during one call of `fn` above the RSS just before it, and the
    call's wall time (a usable timing sample when the call is slow).

    Meant for a worker subprocess (the RSS is the whole process's). Falls back to sampling RSS every
    millisecond with psutil where /proc/self/clear_refs is not writable.
    """
    gc.collect()
    with _exact_rss():
        if _reset_hwm():
            base = _proc_status("VmRSS")
            t0 = time.perf_counter()
            out = fn()
            ms = (time.perf_counter() - t0) * 1e3
            peak = _proc_status("VmHWM")
            del out
            return max(0, peak - base), "rss_hwm", ms
        return _peak_sampled(fn)


def _peak_sampled(fn: Callable[[], object]) -> tuple[int, str, float]:
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(1e-3)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    out = fn()
    ms = (time.perf_counter() - t0) * 1e3
    done.set()
    t.join()
    del out
    return max(0, peak[0] - base), "rss_sampled", ms


def peak_extra_cuda(fn: Callable[[], object]) -> tuple[int, str, float]:
    """(bytes, method, ms): torch.cuda.max_memory_allocated during one call above the allocation before it,
    and the call's synchronised wall time."""
    dev = torch.device("cuda")
    gc.collect()
    _sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(dev)
    del out
    return max(0, peak - base), "cuda_max_allocated", ms


def worker_env() -> dict:
    """Environment for a worker process."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.pop("TRITON_INTERPRET", None)  # never benchmark the Triton interpreter
    return env


def free_memory(device: torch.device) -> int:
    """Bytes a case may use: free GPU memory, or available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # pragma: no cover
        return _proc_status("MemAvailable") or (8 << 30)


def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


_STICKY = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "uncorrectable ecc",
    "cuda error: unknown error",
    "cudaerrorlaunchfailure",
)


def is_sticky_cuda_error(msg: str) -> bool:
    """Errors after which the process's CUDA context is unusable (every later call fails)."""
    m = msg.lower()
    return any(s in m for s in _STICKY)


def clear(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error surfaces here too; the caller has recorded it
            pass


# ------------------------------------------------------------------------------------------- environment


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_info() -> dict:
    """Commit and dirty flag of the checkout; PROTOCLR_GIT_SHA / PROTOCLR_GIT_DIRTY override (a device copy
    of the tree has no .git)."""
    sha = os.environ.get("PROTOCLR_GIT_SHA") or _git("rev-parse", "HEAD")
    dirty_env = os.environ.get("PROTOCLR_GIT_DIRTY")
    if dirty_env is not None:
        dirty = dirty_env not in ("0", "false", "")
    else:
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {"git_sha": sha or "unknown", "git_dirty": dirty}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: torch.device) -> dict:
    """Device, versions, commit, date and host: stored with every result row."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "device": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "threads": torch.get_num_threads(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        **git_info(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            device_name=p.name,
            sm_count=p.multi_processor_count,
            device_mem_gb=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        info.update(device_name=_cpu_name(), cpu_count=os.cpu_count())
    return info


def matmul_probe(device: torch.device, n: int | None = None) -> dict:
    """Measured matmul rate for the "fraction of peak" column: bf16 n³ (8192) on the GPU, fp32 (2048) on the
    CPU, random data (zeros run faster on some GPUs)."""
    if device.type == "cuda":
        n, dtype = n or 8192, torch.bfloat16
    else:
        n, dtype = n or 2048, torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def fn():
        return a @ b

    fn()
    t = time_gpu(fn) if device.type == "cuda" else time_cpu(fn, budget_s=1.0, min_reps=3)
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "n": n,
        "ms": t["median_ms"],
        "tflops": 2.0 * n**3 / (t["median_ms"] * 1e-3) / 1e12,
    }


# ------------------------------------------------------------------------------------------------- JSON


def append_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, (torch.device, Path)):
        return str(o)
    return repr(o)


# ---------------------------------------------------------------------------------------------- baselines


def cdist_siamese_baseline(h, inst, proto, weight, bias, *, balance: bool = True):
    """Dense siamese loss with the L1 head on `torch.cdist(p=1)`: a *speed* baseline only (SPEC §5).

    torch.cdist computes the unweighted L1 distance, so the inputs are scaled by |w| first: the logit is then
    Σ_k |w_k| |h_ik − h_jk| + b, which equals SPEC 1.2's only when w >= 0. The loss value therefore differs
    from `protoclr.ops.siamese_loss` for a general head; the work (an N×N L1 distance matrix, then BCE over
    the i < j pairs, balanced per class) is the same shape. Materialises N×N (and, in cdist's CUDA backward,
    N×N×Dh) buffers.
    """
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    hs = h.to(acc) * weight.reshape(1, -1).abs().to(acc)  # (N, Dh)
    d = torch.cdist(hs, hs, p=1) + bias.reshape(()).to(acc)  # (N, N)
    n = h.size(0)
    y = (inst[:, None] == inst[None, :]) | ((proto[:, None] >= 0) & (proto[:, None] == proto[None, :]))
    upper = torch.ones(n, n, dtype=torch.bool, device=h.device).triu(1)
    loss = F.softplus(d) - y.to(acc) * d
    zero = loss.new_zeros(())
    sums = torch.stack([torch.where(upper & ~y, loss, zero).sum(), torch.where(upper & y, loss, zero).sum()])
    counts = torch.stack([(upper & ~y).sum(), (upper & y).sum()]).to(acc)
    if balance:
        present = counts > 0
        return (sums / counts.clamp(min=1)).sum() / present.sum().clamp(min=1).to(acc)
    return sums.sum() / counts.sum().clamp(min=1)
