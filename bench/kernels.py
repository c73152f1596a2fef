"""Kernel benchmark: every op × backend × size × dtype, with the baselines in the same run (SPEC §5).

Providers: every backend of `protoclr.ops.BACKENDS` (unusable ones are recorded with the reason `resolve`
gives), the backend variants of `VARIANTS` (`triton-sym`: the triton backend with PROTOCLR_TRITON_SYMMETRIC=1,
the symmetric contrastive kernels of kernels/contrastive_sym.py; contrastive only), `compile` = torch.compile
of the reference public op, `cdist` = the torch.cdist L1 head
(`common.cdist_siamese_baseline`, siamese only, speed baseline), `inf-cl` (contrastive, GPU, when the
package is installed: one-directional N×N InfoNCE, a speed baseline) and `gemm` (assign only: the bare x @ cᵀ
of the same shape and dtype, the floor an assign kernel is measured against).
Per case: median time of the forward and of forward+backward, peak extra memory, TFLOP/s by the SPEC §5 FLOP
models and the fraction of the matmul rate measured in the same run; then (`--max-n`) the largest N each
backend runs (doubling N until out of memory or a time cap). Rows are appended to a JSON-lines file (schema:
bench/results/README.md) as they are measured, and a markdown table (bench/table.py) is printed last.

CPU cases run in worker subprocesses (one per op × provider × dtype) so the resident-set growth can be
measured; GPU cases run in this process. Examples:

    python bench/kernels.py --device cpu                    # `make bench`: the issue-3 CPU suite
    python bench/kernels.py --device cuda --budget 240      # compass sizes (bench/gpu_check.sh)
    python bench/kernels.py --device cpu --quick --out /tmp/k.jsonl
    python bench/kernels.py --device cpu --ops contrastive --size contrastive:2048,4096:128 --providers reference,cpu
"""

from __future__ import annotations

import os

# The Triton interpreter (set by tests/conftest.py without a GPU) must never be what we time.
_INTERPRET_WAS_SET = os.environ.pop("TRITON_INTERPRET", None) == "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import common  # noqa: E402
import torch  # noqa: E402

OPS = ("contrastive", "siamese", "assign")
BASELINES = ("compile", "cdist", "inf-cl", "gemm")
# provider -> (backend, environment it runs under, ops it applies to): a backend's opt-in kernels, measured next
# to its default ones in the same run
VARIANTS = {"triton-sym": ("triton", {"PROTOCLR_TRITON_SYMMETRIC": "1"}, ("contrastive",))}
ROW_PREFIX = "@@ROW "

# op -> (feature dim D (Dh for siamese), K for assign, list of N (M for assign), dtype)
PRESETS = {
    # issue 3: contrastive N in {1024, 4096, 8192} D=128; siamese N in {512, 1024, 2048} Dh=512
    "cpu": {
        "contrastive": (128, None, [1024, 4096, 8192], "float32"),
        "siamese": (512, None, [512, 1024, 2048], "float32"),
        "assign": (256, 512, [16384, 65536], "float32"),
    },
    # the compass sizes (issue 9) and a few smaller N for the scaling plots
    "cuda": {
        "contrastive": (128, None, [4096, 16384, 65536], "bfloat16"),
        "siamese": (2048, None, [1024, 2048, 4096, 16384], "bfloat16"),
        "assign": (256, 3000, [1281167], "float32"),
    },
    "quick": {
        "contrastive": (16, None, [64, 128], "float32"),
        "siamese": (16, None, [32, 64], "float32"),
        "assign": (16, 8, [256], "float32"),
    },
}
MODES = {"contrastive": ("fwd", "fwd_bwd"), "siamese": ("fwd", "fwd_bwd"), "assign": ("fwd",)}
# first N of the --max-n probe: (reference-like, fused backend), per device
PROBE_START = {
    "cpu": {"contrastive": (1024, 4096), "siamese": (256, 1024)},
    "cuda": {"contrastive": (4096, 65536), "siamese": (512, 16384)},
}
PROBE_MAX_N = 1 << 24


_HELPERS = None
_CPU_INPUTS: dict = {}  # GPU runs: host copies of the inputs, shared by every provider of a size


def _load_helpers():
    """tests/helpers.py, by path: the one batch factory (a site-packages `tests` package cannot shadow it)."""
    global _HELPERS
    if _HELPERS is None:
        spec = importlib.util.spec_from_file_location("_protoclr_test_helpers", ROOT / "tests" / "helpers.py")
        _HELPERS = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_HELPERS)
    return _HELPERS


# ------------------------------------------------------------------------------------------------ inputs


def _make_inputs_cpu(op: str, n: int, d: int, k: int | None, dtype: torch.dtype, requires_grad: bool) -> dict:
    helpers = _load_helpers()
    g = torch.Generator().manual_seed(0)
    if op == "assign":
        x = helpers.make_batch(n, 1, dz=d, dh=1, k=1, dtype=dtype, generator=g, shuffle=False)["z"]
        c = helpers.make_batch(k, 1, dz=d, dh=1, k=1, dtype=dtype, generator=g, shuffle=False)["z"]
        return {"x": x, "prototypes": c}
    kw = {"dz": d, "dh": 1} if op == "contrastive" else {"dz": 1, "dh": d}
    n_protos = max(2, min(512, n // 16))
    return helpers.make_batch_n(n, **kw, k=n_protos, dtype=dtype, requires_grad=requires_grad, generator=g)


def make_inputs(
    op: str, n: int, d: int, k: int | None, dtype: torch.dtype, device, requires_grad: bool, cache: bool = True
) -> dict:
    """Inputs from tests/helpers.make_batch; views of one image share inst, ~8 images share a prototype."""
    device = torch.device(device)
    if device.type == "cpu":
        return _make_inputs_cpu(op, n, d, k, dtype, requires_grad)
    key = (op, n, d, k, str(dtype), requires_grad)
    host = _CPU_INPUTS.get(key) or _make_inputs_cpu(op, n, d, k, dtype, requires_grad)
    if cache:
        _CPU_INPUTS[key] = host
    return {
        name: t.detach().to(device).requires_grad_(t.requires_grad) if t.is_floating_point() else t.to(device)
        for name, t in host.items()
    }


def _partner(inst: torch.Tensor) -> torch.Tensor:
    """Row index of the other view of each row's image (2 views per image)."""
    order = torch.argsort(inst, stable=True)
    partner = torch.empty_like(order)
    partner[order[0::2]] = order[1::2]
    partner[order[1::2]] = order[0::2]
    return partner


class _ChunksForTracing:
    """Lets torch.compile trace the reference: its chunk loops (siamese N×N×D, assign M×K) are unrolled by
    Dynamo, so they are capped at 8 iterations for the compile baseline (more memory per chunk, same math)."""

    def __init__(self, op: str, n: int, d: int, k: int | None):
        from protoclr.ops import backend_reference as ref

        self.ref, self.saved = ref, (ref._SIAMESE_CHUNK_ELEMS, ref._ASSIGN_CHUNK_ELEMS)
        if op == "siamese":
            ref._SIAMESE_CHUNK_ELEMS = max(self.saved[0], math.ceil(n * n * d / 8))
        elif op == "assign":
            ref._ASSIGN_CHUNK_ELEMS = max(self.saved[1], math.ceil(n * (k or 1) / 8))

    def restore(self) -> None:
        self.ref._SIAMESE_CHUNK_ELEMS, self.ref._ASSIGN_CHUNK_ELEMS = self.saved


def _backend(provider: str) -> str:
    """The backend a provider runs (a variant's base backend; the provider itself otherwise)."""
    return VARIANTS[provider][0] if provider in VARIANTS else provider


@contextlib.contextmanager
def _variant_env(provider: str):
    """The environment of a backend variant (VARIANTS), restored afterwards."""
    settings = VARIANTS[provider][1] if provider in VARIANTS else {}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def make_fns(op: str, provider: str, inp: dict, *, tau: float, fn_mode: str, dynamic: bool = False) -> dict:
    """mode -> zero-argument callable running that mode once (outputs returned, so memory peaks include them).
    `dynamic`: torch.compile with dynamic shapes (one compile for every N; static shapes compile per N)."""
    fns = _make_fns(op, _backend(provider) if provider in VARIANTS else provider, inp, tau=tau, fn_mode=fn_mode,
                    dynamic=dynamic)  # fmt: skip
    if provider not in VARIANTS:
        return fns

    def under_env(f):
        def run():
            with _variant_env(provider):
                return f()

        return run

    return {mode: under_env(f) for mode, f in fns.items()}


def _make_fns(op: str, provider: str, inp: dict, *, tau: float, fn_mode: str, dynamic: bool) -> dict:
    from protoclr import ops

    if op == "assign":
        if provider == "gemm":
            x, c = inp["x"], inp["prototypes"]
            return {"fwd": lambda: x @ c.T}
        if provider == "compile":
            f = torch.compile(lambda x, c: ops.assign(x, c, backend="reference"), dynamic=dynamic)
        else:
            f = lambda x, c: ops.assign(x, c, backend=provider)  # noqa: E731
        x, c = inp["x"], inp["prototypes"]
        return {"fwd": lambda: f(x, c)}

    if op == "contrastive":
        z, inst, proto = inp["z"], inp["inst"], inp["proto"]
        wrt = [z]
        if provider == "inf-cl":
            from inf_cl import cal_inf_loss

            partner = _partner(inst)
            loss = lambda: cal_inf_loss(z / tau, z[partner], head_dim=z.size(1))  # noqa: E731
        else:
            backend = "reference" if provider == "compile" else provider

            def fn(z, inst, proto):
                return ops.contrastive_loss(z, inst, proto, tau=tau, fn_mode=fn_mode, backend=backend)

            f = torch.compile(fn, dynamic=dynamic) if provider == "compile" else fn
            loss = lambda: f(z, inst, proto)  # noqa: E731
    else:
        h, inst, proto, w, b = inp["h"], inp["inst"], inp["proto"], inp["weight"], inp["bias"]
        wrt = [h, w, b]
        if provider == "cdist":
            loss = lambda: common.cdist_siamese_baseline(h, inst, proto, w, b)  # noqa: E731
        else:
            backend = "reference" if provider == "compile" else provider

            def fn(h, inst, proto, w, b):
                return ops.siamese_loss(h, inst, proto, w, b, backend=backend)

            f = torch.compile(fn, dynamic=dynamic) if provider == "compile" else fn
            loss = lambda: f(h, inst, proto, w, b)  # noqa: E731
    return {"fwd": loss, "fwd_bwd": lambda: torch.autograd.grad(loss(), wrt)}


# --------------------------------------------------------------------------------------- availability


def provider_kind(provider: str) -> str:
    return "baseline" if provider in BASELINES else "backend"


def applies(op: str, provider: str, device: torch.device) -> bool:
    """Whether a baseline is defined for this op and device at all (backends always are: if one cannot run,
    the reason is recorded)."""
    if provider == "cdist":
        return op == "siamese"
    if provider == "inf-cl":
        return op == "contrastive" and device.type == "cuda"
    if provider == "gemm":
        return op == "assign"
    if provider in VARIANTS:
        return op in VARIANTS[provider][2]
    return True


def unavailable(op: str, provider: str, device: torch.device) -> str | None:
    """Why `provider` cannot run `op` on `device` (None = it can)."""
    from protoclr import ops

    if provider in VARIANTS:
        return unavailable(op, VARIANTS[provider][0], device)
    if provider in ops.BACKENDS:
        if provider == "triton" and device.type == "cpu":
            return "triton on CPU tensors runs only in the interpreter (TRITON_INTERPRET=1): not benchmarked"
        try:
            ops.resolve(provider, device)
        except Exception as e:  # noqa: BLE001  (the reason is the result)
            return str(e)
        return None
    if provider == "compile":
        return None
    if provider == "cdist":
        return None if op == "siamese" else "cdist is the siamese L1-head baseline only"
    if provider == "gemm":
        return None if op == "assign" else "gemm is the assign floor only"
    if provider == "inf-cl":
        if op != "contrastive":
            return "inf-cl is a contrastive (InfoNCE) baseline only"
        if device.type != "cuda":
            return "inf-cl needs CUDA"
        if importlib.util.find_spec("inf_cl") is None:
            return "inf_cl is not installed"
        return None
    return f"unknown provider {provider!r}"


def est_bytes(op: str, provider: str, mode: str, n: int, d: int, k: int | None, dtype: str, device: str):
    """Rough peak extra bytes of the dense providers (they hold N×N or N×N×D tensors); None for the fused
    backends, whose extra memory is O(N·D). Calibrated against the CPU RSS measurements (bench/results)."""
    acc = 8 if dtype == "float64" else 4
    nn = n * n
    # Measured (CPU RSS, fp32, requires_grad inputs): contrastive reference ~5.2·acc·N² in fwd and fwd+bwd;
    # siamese reference 2·acc·N²·D (autograd keeps every chunk's |h_i - h_j|, even in fwd), compile
    # acc·N²·D (fwd+bwd) and acc·N²·D/8 (fwd); cdist ~7·acc·N²; assign reference acc·M·K (chunked).
    if provider in ("reference", "compile"):
        if op == "contrastive":
            return 8 * acc * nn
        if op == "siamese":
            if provider == "reference":
                extra = 2 * acc * nn * d
            else:
                extra = acc * nn * d if mode == "fwd_bwd" else 2 * acc * math.ceil(nn * d / 8)
            return 8 * acc * nn + extra
        if op == "assign":
            return 2 * acc * (math.ceil(n * k / 8) if provider == "compile" else min(n * k, 1 << 26)) + 16 * n
    if provider == "gemm":
        return acc * n * k
    if provider == "cdist":
        extra = acc * nn * d if (mode == "fwd_bwd" and device == "cuda") else 0  # cdist's CUDA backward buffer
        return 10 * acc * nn + extra
    return None


# ------------------------------------------------------------------------------------------- one group


def _fmt_gb(b: float) -> str:
    return f"{b / 2**30:.1f} GB"


def run_group(spec: dict, emit) -> None:
    """Measure one (op, provider, dtype) over its sizes, then its --max-n probe; `emit(row)` per result.

    spec: op, provider, dtype, device, sizes [[n, d, k], ...], modes, memory, deadline (epoch s or None),
    cpu_budget_s, max_call_s, mem_frac, tau, fn_mode, probe (bool), probe_cap_s, warmup_ms, rep_ms.
    """
    op, provider, dtype_name = spec["op"], spec["provider"], spec["dtype"]
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = spec.get("tf32", True)  # fp32 matmuls as in training
    dtype = getattr(torch, dtype_name)
    base = {"op": op, "provider": provider, "kind": provider_kind(provider), "dtype": dtype_name, "device": device.type}

    def out(**kw):
        emit({**base, **kw})

    why = unavailable(op, provider, device)
    if why is not None:
        out(type="case", n=None, d=None, k=None, mode=None, status="skipped", reason=why)
        return
    if spec.get("sizes"):
        _run_sizes(spec, op, provider, dtype, dtype_name, device, out)
    if spec.get("probe"):
        _run_probe(spec, op, provider, dtype, dtype_name, device, out)


def _run_sizes(spec, op, provider, dtype, dtype_name, device, out) -> None:
    modes = spec["modes"]
    dynamic = bool(spec.get("compile_dynamic"))
    if provider == "compile":
        torch._dynamo.reset()
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    last = None  # (flops of the last measured mode, its median seconds): predicts the next size
    for n, d, k in spec["sizes"]:
        size = {"n": n, "d": d, "k": k}

        done: set[str] = set()

        def skip_all(status, reason, size=size, done=done):
            for mode in modes:
                if mode not in done:
                    out(type="case", **size, mode=mode, status=status, reason=reason)

        if spec.get("deadline") and time.time() > spec["deadline"]:
            skip_all("over_budget", "benchmark time budget (--budget) spent")
            continue
        big = max(common.flops(op, m, n, d, k) for m in modes)
        if last is not None and last[1] * big / last[0] > spec["max_call_s"]:
            pred = last[1] * big / last[0]
            skip_all("skipped", f"predicted {pred:.1f} s per call > --max-call-s {spec['max_call_s']}")
            continue
        budget = spec["mem_frac"] * common.free_memory(device)
        run_modes = []
        for m in modes:
            est = est_bytes(op, provider, m, n, d, k, dtype_name, device.type) or 0
            if est > budget:
                out(
                    type="case",
                    **size,
                    mode=m,
                    status="skipped",
                    reason=f"N×N too large (est. {_fmt_gb(est)} > {_fmt_gb(budget)} budget)",
                )
                done.add(m)
            else:
                run_modes.append(m)
        if not run_modes:
            continue

        chunks = None
        try:
            inp = make_inputs(op, n, d, k, dtype, device, requires_grad=op != "assign")
            if provider == "compile":
                chunks = _ChunksForTracing(op, n, d, k)
                if not dynamic:
                    torch._dynamo.reset()  # a fresh cache per N: never a silent eager fallback at the recompile limit
            fns = make_fns(op, provider, inp, tau=spec["tau"], fn_mode=spec["fn_mode"], dynamic=dynamic)
            if os.environ.get("PROTOCLR_BENCH_FAULT") == f"{op}:{provider}:{n}":  # tests the recovery path
                raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
            # Warm-up (includes torch.compile's and Triton's compiling): fwd_bwd runs the forward too.
            first_s = common.time_once(fns[run_modes[-1]], device)
            for mode in run_modes:
                mem, method, prior = None, None, []
                if spec["memory"]:
                    peak = common.peak_extra_cuda if device.type == "cuda" else common.peak_extra_cpu
                    mem, method, ms0 = peak(fns[mode])
                    prior = [ms0] if ms0 > 50 else []  # a slow call's memory run doubles as a timing sample
                if device.type == "cuda":
                    t = common.time_gpu(fns[mode], warmup_ms=spec["warmup_ms"], rep_ms=spec["rep_ms"])
                else:
                    t = common.time_cpu(fns[mode], budget_s=spec["cpu_budget_s"], prior_ms=prior)
                fl = common.flops(op, mode, n, d, k)
                out(
                    type="case",
                    **size,
                    mode=mode,
                    status="ok",
                    reason=None,
                    **t,
                    flops=fl,
                    tflops=fl / (t["median_ms"] * 1e-3) / 1e12,
                    peak_extra_bytes=mem,
                    mem_method=method,
                    first_call_s=round(first_s, 3),
                    note=_note(provider, op, dynamic),
                    triton_configs=_tuned_configs()
                    if _backend(provider) == "triton" and device.type == "cuda"
                    else None,
                )
                done.add(mode)
                last = (fl, t["median_ms"] * 1e-3)
        except Exception as e:  # noqa: BLE001  (an error is a result; the run goes on)
            status = "oom" if common.is_oom(e) else "error"
            skip_all(status, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}")
        finally:
            if chunks is not None:
                chunks.restore()
            inp = fns = None
            common.clear(device)


def _tuned_configs() -> dict | str:
    """The Triton autotuner's choices so far ({kernel: {key: config}}); never fails the measurement."""
    try:
        from protoclr.kernels.utils import tuned_configs

        return tuned_configs()
    except Exception as e:  # noqa: BLE001
        return f"unavailable: {type(e).__name__}: {e}"


def _note(provider: str, op: str, dynamic: bool) -> str | None:
    if provider != "compile":
        return None
    note = "torch.compile dynamic=True" if dynamic else "torch.compile dynamic=False"
    return note + ("; reference chunk loops capped at 8 for tracing" if op != "contrastive" else "")


def _run_probe(spec, op, provider, dtype, dtype_name, device, out) -> None:
    """Largest N (doubling) whose forward+backward runs: stops at out-of-memory, the time cap, or 2^24."""
    fused = provider_kind(provider) == "backend" and provider != "reference"
    n = spec["probe_start"][1 if fused else 0]
    d, k = spec["probe_d"], None
    mode = "fwd_bwd"
    ok_n, ok = None, None
    stop = None
    while True:
        if spec.get("deadline") and time.time() > spec["deadline"]:
            stop = f"time budget spent before N={n}"
            break
        if n > PROBE_MAX_N:
            stop = f"N cap {PROBE_MAX_N}"
            break
        if ok is not None and ok["s"] * 4 > spec["probe_cap_s"]:
            stop = f"time cap: N={n} predicted {ok['s'] * 4:.1f} s > {spec['probe_cap_s']} s"
            break
        try:
            inp = make_inputs(op, n, d, k, dtype, device, requires_grad=True, cache=False)
            fn = make_fns(op, provider, inp, tau=spec["tau"], fn_mode=spec["fn_mode"])[mode]
            if device.type == "cuda":
                mem, _, _ = common.peak_extra_cuda(fn)  # also the warm-up
                s = common.time_once(fn, device)
            else:
                s = common.time_once(fn, device)
                mem = None
            ok_n, ok = n, {"s": s, "mem": mem}
        except Exception as e:  # noqa: BLE001
            stop = ("out of memory" if common.is_oom(e) else f"{type(e).__name__}") + f" at N={n}"
            break
        finally:
            inp = fn = None
            common.clear(device)
        n *= 2
    out(
        type="max_n",
        n=None,
        d=d,
        k=k,
        mode=mode,
        status="ok" if ok_n else "error",
        reason=stop,
        max_n=ok_n,
        max_n_ms=None if ok is None else ok["s"] * 1e3,
        max_n_peak_extra_bytes=None if ok is None else ok["mem"],
        mem_limit_bytes=spec.get("mem_limit_bytes"),
    )


# ----------------------------------------------------------------------------------------------- worker


DONE_PREFIX = "@@DONE "
STICKY_EXIT = 3


def _worker() -> None:
    """Worker process: runs the group specs read (JSON list) from stdin in order, printing result rows and a
    done marker per group. CPU: a fresh process per group (its RSS growth is the group's), address space
    capped so that running out of memory raises instead of waking the OOM killer. GPU: one process for every
    group; after a sticky CUDA error (illegal access, device assert) it exits and the parent starts another
    for the groups left."""
    specs = json.load(sys.stdin)
    if specs and specs[0]["device"] == "cpu":
        try:
            import resource

            avail = common.free_memory(torch.device("cpu"))
            cap = common._proc_status("VmSize") + int(specs[0]["mem_frac"] * avail)
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
            for spec in specs:
                spec["mem_limit_bytes"] = int(spec["mem_frac"] * avail)
        except (ImportError, ValueError, OSError):
            pass

    sticky = []

    def emit(row):
        if row.get("status") == "error" and common.is_sticky_cuda_error(row.get("reason") or ""):
            sticky.append(row["reason"])
        print(ROW_PREFIX + json.dumps(row), flush=True)

    for i, spec in enumerate(specs):
        run_group(spec, emit)
        if sticky:  # the CUDA context is unusable: let the parent start a fresh process
            sys.stdout.flush()
            os._exit(STICKY_EXIT)
        print(f"{DONE_PREFIX}{i}", flush=True)


def _run_worker(specs: list[dict], emit, verbose: bool) -> int:
    """Run `specs` in one worker process; returns how many of them are finished (done, or given up on after
    the worker died in them, with error rows for what they did not report)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker"]
    seen: set = set()
    done = -1
    err_tail: list[str] = []
    with subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=common.worker_env(),
        cwd=str(ROOT),
    ) as p:
        import threading

        def pump_err():
            for line in p.stderr:
                if verbose:
                    sys.stderr.write(line)
                err_tail.append(line.rstrip())
                del err_tail[:-30]

        t = threading.Thread(target=pump_err, daemon=True)
        t.start()
        p.stdin.write(json.dumps(specs))
        p.stdin.close()
        for line in p.stdout:
            if line.startswith(ROW_PREFIX):
                row = json.loads(line[len(ROW_PREFIX) :])
                seen.add((row["op"], row["provider"], row.get("type"), row.get("n"), row.get("mode")))
                emit(row)
            elif line.startswith(DONE_PREFIX):
                done = int(line[len(DONE_PREFIX) :])
            elif verbose:
                sys.stdout.write(line)
        p.wait()
        t.join(timeout=5)
    if p.returncode == 0:
        return len(specs)
    # The worker died (or left after a sticky CUDA error) inside specs[done + 1].
    spec = specs[done + 1]
    if p.returncode == STICKY_EXIT:
        why = "not run: an earlier case of this group left the CUDA context unusable"
    else:
        why = f"worker exited with {p.returncode}" + (" (killed: out of memory?)" if p.returncode < 0 else "")
        why += ": " + " | ".join(x for x in err_tail[-3:] if x)
    base = {"op": spec["op"], "provider": spec["provider"], "kind": provider_kind(spec["provider"])}
    base.update(dtype=spec["dtype"], device=spec["device"])
    for n, d, k in spec.get("sizes") or []:
        for mode in spec["modes"]:
            if (spec["op"], spec["provider"], "case", n, mode) not in seen:
                emit(
                    {
                        **base,
                        "type": "case",
                        "n": n,
                        "d": d,
                        "k": k,
                        "mode": mode,
                        "status": "error",
                        "reason": why[:400],
                    }
                )
    if spec.get("probe") and (spec["op"], spec["provider"], "max_n", None, "fwd_bwd") not in seen:
        emit(
            {
                **base,
                "type": "max_n",
                "n": None,
                "d": spec["probe_d"],
                "k": None,
                "mode": "fwd_bwd",
                "status": "error",
                "reason": why[:400],
                "max_n": None,
            }
        )
    return done + 2


# ------------------------------------------------------------------------------------------------- main


def _parse_sizes(items: list[str], preset: dict) -> dict:
    """--size op:N1,N2[:D[:K]] (repeatable) overrides the preset's sizes of that op."""
    sizes = {op: list(v) for op, v in preset.items()}
    for item in items or []:
        parts = item.split(":")
        op = parts[0]
        if op not in OPS or len(parts) < 2:
            raise SystemExit(f"--size: expected op:N1,N2[:D[:K]] with op in {OPS}, got {item!r}")
        d, k, ns, dt = sizes[op]
        ns = [int(x) for x in parts[1].split(",")]
        if len(parts) > 2 and parts[2]:
            d = int(parts[2])
        if len(parts) > 3 and parts[3]:
            k = int(parts[3])
        sizes[op] = [d, k, ns, dt]
    return sizes


def build_parser() -> argparse.ArgumentParser:
    from protoclr.ops.checks import FN_MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the tensors live (default: cuda when available)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, short repeats, no torch.compile baseline unless named in --providers (smoke test)",
    )
    p.add_argument("--ops", default=",".join(OPS), help="comma list of ops (default: all)")
    p.add_argument(
        "--providers",
        default=None,
        help="comma list among the backends of protoclr.ops.BACKENDS, their variants "
        f"{','.join(VARIANTS)} and the baselines {','.join(BASELINES)} (default: all)",
    )
    p.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="OP:N1,N2[:D[:K]]",
        help="override one op's sizes, e.g. contrastive:4096,8192:128 or assign:65536:256:512",
    )
    p.add_argument("--dtype", default=None, help="override every op's dtype (float32, bfloat16, float16, float64)")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--fn-mode", default="none", choices=FN_MODES)
    p.add_argument(
        "--no-tf32", action="store_true", help="GPU: fp32 matmuls in full fp32 (default TF32, as in training)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-extra-memory measurement")
    p.add_argument(
        "--compile-dynamic",
        choices=["auto", "0", "1"],
        default="auto",
        help="torch.compile baseline with dynamic shapes: one compile for every N (auto: on the CPU, "
        "where compiling is slow) or static shapes compiled per N (auto: on the GPU, the faster code)",
    )
    p.add_argument(
        "--max-n",
        default=None,
        help="ops for the largest-N probe (comma list, or 'none'); default contrastive,siamese on cuda, "
        "none on cpu (on the CPU N is capped by --max-call-s long before memory)",
    )
    p.add_argument(
        "--probe-cap-s",
        type=float,
        default=None,
        help="stop doubling N when one forward+backward would exceed this (default 2 s GPU, 10 s CPU)",
    )
    p.add_argument(
        "--max-call-s",
        type=float,
        default=None,
        help="skip a size whose call is predicted (from the previous size) above this (default 5 s GPU, 40 s CPU)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0,
        help="seconds for the whole run; cases left when it is spent are recorded as over_budget (0 = none)",
    )
    p.add_argument(
        "--mem-frac",
        type=float,
        default=None,
        help="share of free memory a dense (N×N) baseline may be estimated to need (default 0.9 GPU, 0.7 CPU)",
    )
    p.add_argument(
        "--out", default=None, help="JSON-lines file to append to (default bench/results/kernels_<device>.jsonl)"
    )
    p.add_argument("--table", default=None, help="also write the markdown table to this file")
    p.add_argument("--verbose", action="store_true", help="show the workers' output")
    p.add_argument(
        "--one-worker",
        action="store_true",
        help="run every group in one worker process, restarted after a sticky CUDA error (the GPU mode; "
        "on the CPU only to test that path: memory is then not per group)",
    )
    return p


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_worker":
        _worker()
        return 0
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    if _INTERPRET_WAS_SET:
        print("kernels.py: ignoring TRITON_INTERPRET=1 (the interpreter is never benchmarked)", file=sys.stderr)
    t_start = time.time()
    if device.type == "cuda":  # the trainer runs fp32 matmuls (k-means' assign) in TF32; recorded in env
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
    deadline = t_start + args.budget if args.budget > 0 else None
    gpu = device.type == "cuda"

    from protoclr import ops

    preset = PRESETS["quick" if args.quick else device.type]
    sizes = _parse_sizes(args.size, preset)
    sel_ops = [o for o in args.ops.split(",") if o]
    for o in sel_ops:
        if o not in OPS:
            raise SystemExit(f"--ops: unknown op {o!r}; choose from {OPS}")
    all_providers = list(ops.BACKENDS) + list(VARIANTS) + list(BASELINES)
    if args.providers:
        providers = [x for x in args.providers.split(",") if x]
        for x in providers:
            if x not in all_providers:
                raise SystemExit(f"--providers: unknown {x!r}; choose from {all_providers}")
    else:
        providers = [x for x in all_providers if not (args.quick and x == "compile")]
    if args.max_n is None:
        probe_ops = ["contrastive", "siamese"] if (gpu and not args.quick) else []
    else:
        probe_ops = [] if args.max_n == "none" else [o for o in args.max_n.split(",") if o]

    out_path = Path(args.out) if args.out else common.RESULTS / f"kernels_{device.type}.jsonl"
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"
    env = common.env_info(device)
    probe = common.matmul_probe(device, n=512 if args.quick else None)
    common.clear(device)  # the workers get the memory
    print(
        f"kernels.py: {env['device_name']} | torch {env['torch']} | triton {env['triton']} | "
        f"git {env['git_sha'][:10]}{'+dirty' if env['git_dirty'] else ''} | matmul {probe['dtype']} "
        f"{probe['tflops']:.3g} TFLOP/s | run {run_id} -> {out_path}",
        flush=True,
    )
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"schema": common.SCHEMA, "bench": "kernels", "run_id": run_id, **row}
        if row.get("tflops") is not None:
            row["frac_matmul"] = row["tflops"] / probe["tflops"]
        row["matmul_probe"] = probe
        row["fn_mode"] = args.fn_mode if row["op"] == "contrastive" else None
        row["env"] = env
        rows.append(row)
        common.append_jsonl(out_path, [row])
        _print_progress(row)

    def spec_for(op, provider, with_sizes=True, probe=False):
        d, k, ns, dt = sizes[op]
        return {
            "op": op,
            "provider": provider,
            "dtype": args.dtype or dt,
            "device": device.type,
            "sizes": [[n, d, k] for n in sorted(ns)] if with_sizes else [],
            "modes": list(MODES[op]),
            "memory": not args.no_memory,
            "deadline": deadline,
            "cpu_budget_s": 0.3 if args.quick else 2.0,
            "max_call_s": args.max_call_s or (5.0 if gpu else 40.0),
            "mem_frac": args.mem_frac or (0.9 if gpu else 0.7),
            "tf32": not args.no_tf32,
            "tau": args.tau,
            "fn_mode": args.fn_mode,
            "compile_dynamic": (not gpu) if args.compile_dynamic == "auto" else args.compile_dynamic == "1",
            "warmup_ms": 25,
            "rep_ms": 100,
            "probe": probe,
            "probe_cap_s": args.probe_cap_s or (2.0 if gpu else 10.0),
            "probe_start": PROBE_START[device.type].get(op, (256, 1024)),
            "probe_d": d,
        }

    # Order = priority under --budget (the GPU check): what the issue targets need first (fused contrastive;
    # fused siamese and its torch.compile baseline), then the dense baselines, assign, the other compile
    # baselines (compiling takes long), and the max-N probe last.
    def priority(op: str, pv: str) -> int:
        cls = (
            "fused"
            if (_backend(pv) in ops.BACKENDS and pv != "reference")
            else "compile"
            if pv == "compile"
            else "dense"
        )
        order = [("contrastive", "fused"), ("siamese", "fused"), ("siamese", "compile"), ("contrastive", "dense"),
                 ("siamese", "dense"), ("assign", "fused"), ("assign", "dense"), ("contrastive", "compile"),
                 ("assign", "compile")]  # fmt: skip
        return order.index((op, cls)) if (op, cls) in order else len(order)

    pairs = [(op, pv) for op in sel_ops for pv in providers if applies(op, pv, device)]
    groups = [spec_for(op, pv) for op, pv in sorted(pairs, key=lambda p: priority(*p))]
    for op in probe_ops:
        if op not in MODES or op == "assign":
            continue
        for pv in providers:
            if _backend(pv) in ops.BACKENDS and applies(op, pv, device) and unavailable(op, pv, device) is None:
                groups.append(spec_for(op, pv, with_sizes=False, probe=True))

    runnable = []
    for spec in groups:
        why = unavailable(spec["op"], spec["provider"], device)
        if why is None:
            runnable.append(spec)
        elif spec.get("sizes"):  # recorded here: no worker needed to say so
            emit(
                {
                    "op": spec["op"],
                    "provider": spec["provider"],
                    "kind": provider_kind(spec["provider"]),
                    "dtype": spec["dtype"],
                    "device": device.type,
                    "type": "case",
                    "n": None,
                    "d": None,
                    "k": None,
                    "mode": None,
                    "status": "skipped",
                    "reason": why,
                }
            )
    if gpu or args.one_worker:
        while runnable:  # one process for every group; a fresh one after a sticky CUDA error
            runnable = runnable[_run_worker(runnable, emit, args.verbose) :]
    else:
        for spec in runnable:  # a fresh process per group: its RSS growth is its own
            _run_worker([spec], emit, args.verbose)

    import table

    text = table.render(rows)
    if args.table:
        Path(args.table).write_text(text + "\n")
    print(f"\nkernels.py: {len(rows)} rows in {time.time() - t_start:.0f} s appended to {out_path}\n")
    print(text)
    return 0


def _print_progress(row: dict) -> None:
    what = f"{row['op']:<11} {row['provider']:<8} {row['dtype']:<8}"
    if row["type"] == "max_n":
        print(f"  {what} max N {row.get('max_n')} ({row.get('reason')})", flush=True)
    elif row["status"] == "ok":
        mem = row.get("peak_extra_bytes")
        mem_s = f" {mem / 2**20:9.1f} MB" if mem is not None else ""
        print(
            f"  {what} N={row['n']:<8} {row['mode']:<7} {row['median_ms']:10.3f} ms "
            f"{row['tflops']:8.3f} TFLOP/s{mem_s}",
            flush=True,
        )
    else:
        n = f"N={row['n']} {row['mode']}" if row.get("n") else ""
        print(f"  {what} {n} {row['status']}: {row.get('reason')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
