"""sm_90 (H100/H200) resource audit that needs no GPU: registers, spills and shared memory of every kernel.

Triton part: every Triton kernel × every variant its launcher can select (input dtype, fn_mode, HAS_BIAS,
feature-width branches D_SINGLE / EVEN_D, aligned or ragged sizes, the opt-in fp32 dot precisions) is compiled
ahead of time for GPUTarget("cuda", 90, 32), with its default config and, in a full sweep, every autotune
candidate. The arguments are those the launcher itself passes: each launcher runs on `meta` tensors at the
compass sizes with `launch` replaced by a recorder, so signatures, divisibility-16 specialisation and
constexprs are exactly the GPU ones. The kernel's pruner (`early_config_prune`, tuning forced on) gives the
candidates; its first is the default (what runs with PROTOCLR_TRITON_AUTOTUNE=0 or below AUTOTUNE_MIN_WORK).
ptxas's own `-v` log of each compile gives registers and spill bytes, `metadata.shared` the shared memory.
The device image has Triton 3.6 (SPEC §6): `--triton-path DIR` audits with that version, installed beside
the environment's (`pip install --target DIR --no-deps triton==3.6.0`); register allocation differs between
versions.

CUDA part: `cuobjdump` on the built extension (protoclr/_C*.so): for each sm_90 cubin, per kernel registers,
static shared memory (on sm_90 it includes 1 KiB reserved by the system), stack frame and local memory
(`--dump-resource-usage`), the launch bound (EIATTR_MAX_THREADS, `-elf`) and local-memory instructions (STL/LDL
in `-sass`: spill code or local arrays). Dynamic shared memory is chosen at launch and is not in the cubin.

Limits checked (sm_90): 232,448 bytes (227 KiB) of shared memory per block (opt-in), 255 registers per
thread, registers × threads <= 65,536 per SM. Rows are appended to bench/results/sm90_resources.jsonl (one
per kernel × variant × config, or per CUDA kernel) with the environment; a table is printed last.

    python bench/sm90_resources.py            # full sweep: ~500 compiles, 10-20 min on 2 cores
    python bench/sm90_resources.py --quick    # default configs only: ~170 compiles, 2-3 min
"""

from __future__ import annotations

import os


def _triton_path_from_argv() -> None:
    """--triton-path DIR: import Triton from DIR (e.g. `pip install --target DIR --no-deps triton==3.6.0`, the
    device image's version) instead of the environment's; set before anything imports triton, and through
    PYTHONPATH for the spawned compile workers."""
    import sys

    for i, a in enumerate(sys.argv):
        path = a.split("=", 1)[1] if a.startswith("--triton-path=") else None
        if a == "--triton-path" and i + 1 < len(sys.argv):
            path = sys.argv[i + 1]
        if path:
            sys.path.insert(0, path)
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [path, os.environ.get("PYTHONPATH")]))


if __name__ == "__main__":
    # The audit compiles for a GPU: the CPU interpreter (tests/conftest.py sets it) must be off before the
    # kernels are decorated, i.e. before protoclr.kernels is imported (the spawned workers inherit this).
    # Imported as a module (tests use the parsers), nothing is changed.
    os.environ.pop("TRITON_INTERPRET", None)
    _triton_path_from_argv()

import argparse  # noqa: E402
import concurrent.futures as cf  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from common import RESULTS, append_jsonl, env_info  # noqa: E402

from protoclr.ops.checks import FN_MODES  # noqa: E402

SCHEMA = 1
# sm_90 limits (CUDA C Programming Guide, compute capability 9.0)
SMEM_PER_BLOCK = 232448  # 227 KiB, opt-in dynamic shared memory per block
SMEM_PER_SM = 233472  # 228 KiB
SMEM_RESERVED_PER_BLOCK = 1024
MAX_REGS = 255
REGS_PER_SM = 65536
MAX_BLOCKS_PER_SM = 32
CAPABILITY = 90

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# Compass sizes (README): contrastive N = 65,536, D = 128; siamese N = 16,384, Dh = 2048; assign 1.28M × 256, K = 3000.
# Plus ragged cases (sizes not divisible by 16: no alignment specialisation; D = 100: masked feature tails,
# EVEN_D = False) and, for the contrastive kernels, a wide-feature case (the BLOCK_D loop, D_SINGLE = False).
CONTRASTIVE_SHAPES = {"d128": (65536, 128), "n_odd": (65535, 128), "d100": (65536, 100), "d512": (16384, 512)}
SIAMESE_SHAPES = {"compass": (16384, 2048), "ragged": (16383, 100)}
ASSIGN_SHAPES = {"compass": (1_280_000, 3000, 256)}
FP32_DOT_OPT_IN = ("tf32", "ieee")  # PROTOCLR_TRITON_FP32_DOT alternatives to the default tf32x3
# The full sweep compiles every autotune config for these; other variants (fp64: GPU tests only, at sizes
# below AUTOTUNE_MIN_WORK; fn_mode "attract": the kernels' code for "none"; opt-in fp32 dot precisions) get
# their default config only. A full sweep of everything is ~1,000 compiles (over an hour on 2 cores).
SWEEP_DTYPES = ("fp32", "fp16", "bf16")
SWEEP_FN_MODES = ("none", "mask")


def variants(quick: bool, dtypes=None, cases=None, fn_modes=None, kernels=None) -> list[dict]:
    """Every launch variant: kernel, dtype, branch (the constexpr choices the launcher makes), shape case.
    `opt_in`: selected only by a non-default environment setting (PROTOCLR_TRITON_FP32_DOT);
    `sweep`: every autotune config is compiled in a full sweep (else the default only)."""
    out = []
    for dt in DTYPES:
        for bias in (False, True):
            for case in ASSIGN_SHAPES:
                out.append(dict(op="assign", kernel="_assign_kernel", dtype=dt, case=case, has_bias=bias))
    for kernel in ("_contrastive_fwd_kernel", "_contrastive_bwd_rows_kernel", "_contrastive_bwd_cols_kernel"):
        for dt in DTYPES:
            for fn_mode in FN_MODES:
                for case in CONTRASTIVE_SHAPES:
                    out.append(dict(op="contrastive", kernel=kernel, dtype=dt, case=case, fn_mode=fn_mode))
            if dt == "fp32" and not quick:
                for prec in FP32_DOT_OPT_IN:
                    for case in CONTRASTIVE_SHAPES:
                        out.append(
                            dict(op="contrastive", kernel=kernel, dtype=dt, case=case, fn_mode="mask", fp32_dot=prec)
                        )
    for kernel in ("_siamese_fwd_kernel", "_siamese_bwd_kernel"):
        for dt in DTYPES:
            for case in SIAMESE_SHAPES:
                out.append(dict(op="siamese", kernel=kernel, dtype=dt, case=case))
    keep = []
    for v in out:
        v["opt_in"] = "fp32_dot" in v
        v["sweep"] = v["dtype"] in SWEEP_DTYPES and v.get("fn_mode", "none") in SWEEP_FN_MODES and not v["opt_in"]
        if dtypes and v["dtype"] not in dtypes:
            continue
        if cases and v["case"] not in cases:
            continue
        if fn_modes and "fn_mode" in v and v["fn_mode"] not in fn_modes:
            continue
        if kernels and v["kernel"] not in kernels:
            continue
        keep.append(v)
    return keep


def _capture(v: dict):
    """(autotuned kernel, positional args, constexpr kwargs) exactly as the launcher passes them for variant v,
    from a run of the launcher on meta tensors with `launch` recorded instead of executed."""
    from protoclr.kernels import assign, contrastive, siamese

    calls = []

    def record(kernel, grid, *args, **kwargs):
        calls.append((kernel, args, kwargs))

    mods = (assign, contrastive, siamese)
    saved = [m.launch for m in mods]
    saved_prec = contrastive.FP32_DOT_PRECISION
    for m in mods:
        m.launch = record
    if "fp32_dot" in v:
        contrastive.FP32_DOT_PRECISION = v["fp32_dot"]
    try:
        dev, dt = "meta", DTYPES[v["dtype"]]
        acc = torch.float64 if dt == torch.float64 else torch.float32

        def labels(n):
            return torch.empty(n, dtype=torch.int64, device=dev)

        if v["op"] == "assign":
            m, k, d = ASSIGN_SHAPES[v["case"]]
            x = torch.empty(m, d, dtype=dt, device=dev)
            c = torch.empty(k, d, dtype=dt, device=dev)
            assign.assign(x, c, torch.empty(k, dtype=acc, device=dev) if v["has_bias"] else None)
        elif v["op"] == "contrastive":
            n, d = CONTRASTIVE_SHAPES[v["case"]]
            z = torch.empty(n, d, dtype=dt, device=dev)
            lab = labels(n)
            if v["kernel"] == "_contrastive_fwd_kernel":
                contrastive.contrastive_fwd(z, z, lab, lab, lab, lab, 0, 0.5, v["fn_mode"] == "mask")
            else:
                g, gs, lse = (torch.empty(s, dtype=acc, device=dev) for s in ((n,), (n, 5), (n,)))
                contrastive.contrastive_bwd(g, gs, z, z, lab, lab, lab, lab, lse, 0, 0.5, v["fn_mode"] == "mask")
        else:
            n, d = SIAMESE_SHAPES[v["case"]]
            h = torch.empty(n, d, dtype=dt, device=dev)
            lab = labels(n)
            w, b = torch.empty(d, dtype=dt, device=dev), torch.empty(1, dtype=dt, device=dev)
            if v["kernel"] == "_siamese_fwd_kernel":
                siamese.siamese_fwd(h, h, lab, lab, lab, lab, w, b, 0)
            else:
                siamese.siamese_bwd(torch.empty(n, 2, dtype=acc, device=dev), h, h, lab, lab, lab, lab, w, b, 0)
    finally:
        for m, f in zip(mods, saved):
            m.launch = f
        contrastive.FP32_DOT_PRECISION = saved_prec
    found = [c for c in calls if _jit_fn(c[0]).__name__ == v["kernel"]]
    if len(found) != 1:
        raise RuntimeError(f"{v}: launcher made {len(found)} launches of {v['kernel']}")
    return found[0]


def _jit_fn(kernel):
    """The JITFunction under an Autotuner (or a JITFunction itself)."""
    from triton.runtime.jit import JITFunction

    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def _cfg_dict(cfg) -> dict:
    return {"meta": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _cfg_name(c: dict) -> str:
    blocks = ",".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in c["meta"].items())
    return f"{blocks} w{c['num_warps']} s{c['num_stages']}"


def plan(v: dict) -> list[dict]:
    """The configs to compile for variant v: role "default" (what runs without tuning), "autotune" (kept by the
    pruner: compiled at tuning time), "pruned" (never compiled for this variant on a GPU; audited anyway)."""
    from protoclr.kernels import utils

    kernel, args, kwargs = _capture(v)
    utils.AUTOTUNE, utils.AUTOTUNE_MIN_WORK = True, 0  # the full candidate list, whatever the size
    nargs = dict(zip(_jit_fn(kernel).arg_names, args))
    kept = kernel.early_config_prune(kernel.configs, nargs, **kwargs)
    rows = []
    for i, cfg in enumerate(kept):
        rows.append({"config": _cfg_dict(cfg), "role": "default" if i == 0 else "autotune"})
    kept_keys = {json.dumps(r["config"], sort_keys=True) for r in rows}
    for cfg in kernel.configs:
        if json.dumps(_cfg_dict(cfg), sort_keys=True) not in kept_keys:
            rows.append({"config": _cfg_dict(cfg), "role": "pruned"})
    return rows


# ------------------------------------------------------------------------------------------- compiling

_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from a `ptxas -v` log (one entry function)."""
    spill, regs = _PTXAS_SPILL.search(log), _PTXAS_REGS.search(log)
    if not (spill and regs):
        raise ValueError(f"unrecognised ptxas log:\n{log}")
    return {
        "registers": int(regs.group(1)),
        "stack_bytes": int(spill.group(1)),
        "spill_stores": int(spill.group(2)),
        "spill_loads": int(spill.group(3)),
    }


def _ptxas_path() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")


def _ptxas_extra_flags() -> list[str]:
    """Register-allocation flags this Triton passes to ptxas (3.8 adds --regAllocOptLevel=2, 3.6 none)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    return ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin) else []


def _ptxas_log(ptx: str) -> str:
    """ptxas -v on Triton's PTX with the flags Triton uses (for a compile served from Triton's cache)."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [_ptxas_path(), "-lineinfo", "-v", *_ptxas_extra_flags(), f"--gpu-name=sm_{CAPABILITY}a", str(src)]
        r = subprocess.run(cmd + ["-o", str(Path(d) / "k.o")], capture_output=True, text=True, timeout=600)
        return r.stdout + r.stderr


def blocks_per_sm(registers: int, threads: int, shared: int) -> int:
    """Resident blocks per SM allowed by registers (allocated per warp in units of 256) and shared memory."""
    warps = (threads + 31) // 32
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED_PER_BLOCK)
    return min(by_regs, by_smem, MAX_BLOCKS_PER_SM)


def check_limits(row: dict) -> list[str]:
    """The sm_90 limits a compiled kernel breaks (empty when it fits)."""
    bad = []
    if row["shared"] > SMEM_PER_BLOCK:
        bad.append(f"shared {row['shared']} B > {SMEM_PER_BLOCK} B per block")
    if row["registers"] > MAX_REGS:
        bad.append(f"{row['registers']} registers > {MAX_REGS}")
    if row["registers"] * row["threads"] > REGS_PER_SM:
        bad.append(f"{row['registers']} registers × {row['threads']} threads > {REGS_PER_SM}")
    return bad


def compile_one(task: dict) -> dict:
    """Compile one (variant, config) for sm_90; returns the result row (status ok / error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    torch.set_num_threads(1)
    v, c = task["variant"], task["config"]
    row = {**{k: v[k] for k in v}, "config": _cfg_name(c), "role": task["role"], **c}
    t0 = time.perf_counter()
    try:
        kernel, args, kwargs = _capture(v)
        fn = _jit_fn(kernel)
        target = GPUTarget("cuda", CAPABILITY, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        # as JITFunction.run does: launcher constexprs + the config's meta-parameters and compile options
        kw = {**kwargs, **c["meta"], "num_warps": c["num_warps"], "num_stages": c["num_stages"], "debug": False}
        bound, spec, opts = binder(*args, **kw)
        options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        row["constexprs"] = {
            k: (str(val) if not isinstance(val, (int, float, bool, str)) else val) for k, val in kwargs.items()
        }
        knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        text = log.getvalue()
        if not _PTXAS_REGS.search(text):  # served from Triton's cache: no ptxas ran
            text = _ptxas_log(k.asm["ptx"])
        row.update(parse_ptxas(text))
        row["shared"] = int(k.metadata.shared)
        row["threads"] = 32 * int(k.metadata.num_warps)
        row["blocks_per_sm"] = blocks_per_sm(row["registers"], row["threads"], row["shared"])
        row["violations"] = check_limits(row)
        row["status"] = "ok"
    except Exception as e:  # a compile error is a result: the config would fail at tuning time
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["status"] = "error"
        msg = f"{type(e).__name__}: {e}"
        row["error"] = msg if len(msg) < 2000 else msg[:1000] + " ... " + msg[-1000:]
    return row


def _progress_line(r: dict) -> str:
    head = f"{r['kernel']} {r['dtype']} {_branch(r)} [{r['config']}] {r['role']}"
    if r["status"] != "ok":
        return f"{head}: ERROR {r['error'].splitlines()[0][:120]}"
    return (
        f"{head}: {r['registers']} regs, spill "
        f"{r['spill_stores']}/{r['spill_loads']} B, smem {r['shared']} B, {r['compile_s']} s"
        + (f"  !! {'; '.join(r['violations'])}" if r["violations"] else "")
    )


def triton_rows(quick: bool, jobs: int, log=print, pruned: bool = False, **filters) -> list[dict]:
    """Compile rows for the selected variants: default configs (quick), plus every autotune candidate of the
    sweep variants (full), plus the configs the pruner drops (`pruned`: compiled only on request, else listed
    with status "not_compiled")."""
    tasks, skipped = [], []
    for v in variants(quick, **filters):
        for p in plan(v):
            if p["role"] != "default" and (quick or not v["sweep"]):
                continue
            if p["role"] == "pruned" and not pruned:
                skipped.append(
                    {**v, "config": _cfg_name(p["config"]), "role": "pruned", **p["config"], "status": "not_compiled"}
                )
                continue
            tasks.append({"variant": v, "config": p["config"], "role": p["role"]})
    log(f"triton: {len(tasks)} compiles for sm_{CAPABILITY} on {jobs} worker(s)")
    rows: list[dict | None] = [None] * len(tasks)
    t0 = time.perf_counter()
    cache = tempfile.mkdtemp(prefix="sm90_triton_cache_")  # fresh: every compile real, ptxas log and time included
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        if jobs <= 1:
            for i, task in enumerate(tasks):
                rows[i] = compile_one(task)
                log(f"  [{i + 1}/{len(tasks)} {time.perf_counter() - t0:.0f} s] {_progress_line(rows[i])}")
        else:
            with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futs = {pool.submit(compile_one, t): i for i, t in enumerate(tasks)}
                for n, fut in enumerate(cf.as_completed(futs), 1):
                    i = futs[fut]
                    rows[i] = fut.result()
                    log(f"  [{n}/{len(tasks)} {time.perf_counter() - t0:.0f} s] {_progress_line(rows[i])}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows + skipped


# ----------------------------------------------------------------------------------------------- CUDA


def cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, the PATH, or the copy Triton ships."""
    cands = []
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cands.append(Path(home) / "bin" / "cuobjdump")
    if shutil.which("cuobjdump"):
        cands.append(Path(shutil.which("cuobjdump")))
    with contextlib.suppress(Exception):
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def extension_path() -> Path | None:
    env = os.environ.get("PROTOCLR_C_PATH")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[1] / "protoclr"
    found = sorted(root.glob("_C*.so"))
    return found[0] if found else None


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60)
    out = r.stdout.splitlines()
    return dict(zip(names, out)) if r.returncode == 0 and len(out) == len(names) else {n: n for n in names}


_RES_FN = re.compile(r"^\s*Function (\S+):\s*$")
_RES_VALS = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resource_usage(text: str) -> dict[str, dict]:
    """`cuobjdump --dump-resource-usage` of one cubin -> {mangled name: registers, stack, static shared, local}."""
    out, name = {}, None
    for line in text.splitlines():
        m = _RES_FN.match(line)
        if m:
            name = m.group(1)
            continue
        m = _RES_VALS.search(line)
        if m and name:
            reg, stack, shared, local = map(int, m.groups())
            out[name] = {"registers": reg, "stack_bytes": stack, "static_shared": shared, "local_bytes": local}
            name = None
    return out


def parse_max_threads(elf_text: str) -> dict[str, int]:
    """EIATTR_MAX_THREADS (the __launch_bounds__ / .maxntid) per kernel from `cuobjdump -elf`."""
    out = {}
    for block in re.split(r"\n(?=\.nv\.info\.)", elf_text):
        m = re.match(r"\.nv\.info\.(\S+)", block)
        if not m:
            continue
        t = re.search(
            r"EIATTR_MAX_THREADS\s*\n\s*Format:.*\n\s*Value:\s*(0x[0-9a-f]+) (0x[0-9a-f]+) (0x[0-9a-f]+)", block
        )
        if t:
            out[m.group(1)] = int(t.group(1), 16) * int(t.group(2), 16) * int(t.group(3), 16)
    return out


def parse_local_instrs(sass: str) -> dict[str, tuple[int, int]]:
    """(STL, LDL) instruction counts per kernel from `cuobjdump -sass`: local-memory traffic (spills, local arrays)."""
    out = {}
    for block in sass.split("Function : ")[1:]:
        name, _, body = block.partition("\n")
        out[name.strip()] = (len(re.findall(r"\bSTL(\.\S+)?\s", body)), len(re.findall(r"\bLDL(\.\S+)?\s", body)))
    return out


def cuda_rows(log=print) -> tuple[list[dict], str | None]:
    """Per-kernel rows for the sm_90 cubins of the built extension, or ([], reason) when there are none."""
    path, tool = extension_path(), cuobjdump()
    if path is None or not path.is_file():
        return [], "protoclr._C is not built"
    if tool is None:
        return [], "cuobjdump not found (CUDA toolkit bin/, PATH, or triton's backends/nvidia/bin)"
    with open(path, "rb") as f:
        if b".nv_fatbin" not in f.read():
            return [], f"{path.name} is a CPU-only build (no .nv_fatbin section)"
    listing = subprocess.run([tool, "--list-elf", str(path)], capture_output=True, text=True, timeout=120)
    cubins = re.findall(rf"ELF file\s+\d+:\s+(\S+\.sm_{CAPABILITY}a?\.cubin)", listing.stdout)
    if not cubins:
        return [], f"no sm_{CAPABILITY} cubin in {path.name}:\n{listing.stdout}"
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cubin in cubins:
            subprocess.run([tool, "-xelf", cubin, str(path)], cwd=d, capture_output=True, check=True, timeout=300)
            f = str(Path(d) / cubin)
            res = parse_resource_usage(
                subprocess.run([tool, "--dump-resource-usage", f], capture_output=True, text=True, timeout=300).stdout
            )
            threads = parse_max_threads(
                subprocess.run([tool, "-elf", f], capture_output=True, text=True, timeout=300).stdout
            )
            local = parse_local_instrs(
                subprocess.run([tool, "-sass", f], capture_output=True, text=True, timeout=600).stdout
            )
            names = demangle(sorted(res))
            for mangled, r in sorted(res.items()):
                mt = threads.get(mangled)
                stl, ldl = local.get(mangled, (None, None))
                row = {
                    "part": "cuda", "cubin": cubin, "kernel": names[mangled], "mangled": mangled, **r,
                    "max_threads": mt, "stl_instrs": stl, "ldl_instrs": ldl,
                }  # fmt: skip
                bad = []
                if r["registers"] > MAX_REGS:
                    bad.append(f"{r['registers']} registers > {MAX_REGS}")
                if mt and r["registers"] * mt > REGS_PER_SM:
                    bad.append(f"{r['registers']} registers × {mt} threads > {REGS_PER_SM}")
                if r["static_shared"] > SMEM_PER_BLOCK:
                    bad.append(f"static shared {r['static_shared']} B > {SMEM_PER_BLOCK} B")
                row["violations"] = bad
                rows.append(row)
    log(f"cuda: {len(rows)} kernels in {len(cubins)} sm_{CAPABILITY} cubins of {path.name}")
    return rows, None


# ----------------------------------------------------------------------------------------------- table


def short_kernel(name: str) -> str:
    """`void protoclr::cuda::(anonymous namespace)::assign_kernel<float, true>(protoclr::cuda::AssignParams)`
    -> `assign_kernel<float, true>`."""
    name = name.replace("(anonymous namespace)::", "")
    name = name.split("(")[0]
    name = re.sub(r"^void ", "", name)
    return re.sub(r"^protoclr::cuda::(contrastive::)?", "", name)


def _branch(r: dict) -> str:
    parts = [r["case"]]
    if "fn_mode" in r:
        parts.append(r["fn_mode"])
    if "has_bias" in r:
        parts.append("bias" if r["has_bias"] else "nobias")
    if "fp32_dot" in r:
        parts.append(r["fp32_dot"])
    return " ".join(parts)


def print_tables(rows: list[dict], all_configs: bool) -> None:
    tri = [
        r
        for r in rows
        if r.get("part") == "triton" and r["status"] != "not_compiled" and (all_configs or r["role"] == "default")
    ]
    if tri:
        print(f"\n## Triton, sm_{CAPABILITY} ({'every config' if all_configs else 'default configs'})\n")
        cols = ["kernel", "dtype", "branch", "config", "role", "regs", "spill st/ld B", "smem B", "blocks/SM"]
        print("| " + " | ".join(cols + ["compile s", "status"]) + " |")
        print("|---" * (len(cols) + 2) + "|")
        for r in tri:
            if r["status"] == "ok":
                status = "; ".join(r["violations"]) or "ok"
                cells = [r["registers"], f"{r['spill_stores']}/{r['spill_loads']}", r["shared"], r["blocks_per_sm"]]
            else:
                status = "ERROR " + r["error"].splitlines()[0][:80]
                cells = ["-", "-", "-", "-"]
            print(
                f"| {r['kernel']} | {r['dtype']} | {_branch(r)} | {r['config']} | {r['role']} | "
                + " | ".join(str(c) for c in cells)
                + f" | {r['compile_s']} | {status} |"
            )
    cu = [r for r in rows if r.get("part") == "cuda"]
    if cu:
        print(f"\n## CUDA (protoclr._C), sm_{CAPABILITY}\n")
        print("| kernel | regs | max threads | static smem B | stack B | local B | STL/LDL | status |")
        print("|---|---|---|---|---|---|---|---|")
        for r in cu:
            status = "; ".join(r["violations"]) or "ok"
            print(
                f"| {short_kernel(r['kernel'])} | {r['registers']} | {r['max_threads']} | {r['static_shared']} | "
                f"{r['stack_bytes']} | {r['local_bytes']} | {r['stl_instrs']}/{r['ldl_instrs']} | {status} |"
            )


# ------------------------------------------------------------------------------------------------ main


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("sm90_resources", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="default configs only (what runs without autotuning)")
    p.add_argument("--jobs", type=int, default=2, help="compile worker processes (at most 2: shared 2-core machines)")
    p.add_argument("--kernels", default="", help="comma-separated Triton kernel names (default: all)")
    p.add_argument("--dtypes", default="", help=f"comma-separated input dtypes of {sorted(DTYPES)} (default: all)")
    p.add_argument("--cases", default="", help="comma-separated shape cases, e.g. d128,compass (default: all)")
    p.add_argument("--fn-modes", default="", help=f"comma-separated contrastive fn_modes of {FN_MODES} (default: all)")
    p.add_argument("--triton-path", default=None,
                   help="import Triton from this directory (the device image has Triton 3.6: "
                        "pip install --target DIR --no-deps triton==3.6.0)")  # fmt: skip
    p.add_argument("--pruned", action="store_true",
                   help="also compile the configs the pruners drop (never launched for that variant)")  # fmt: skip
    p.add_argument("--no-triton", action="store_true", help="skip the Triton part")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA (cuobjdump) part")
    p.add_argument("--out", default=str(RESULTS / "sm90_resources.jsonl"), help="JSON-lines file rows are appended to")
    p.add_argument("--no-write", action="store_true", help="print only, append nothing")
    p.add_argument("--table", choices=("default", "all"), default=None,
                   help="rows of the Triton table printed (default: all; defaults only for --quick)")  # fmt: skip
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    from protoclr.kernels import utils

    if utils.INTERPRET:
        raise SystemExit("sm90_resources: TRITON_INTERPRET=1 is set; the audit compiles for sm_90, unset it")
    import triton

    jobs = max(1, min(args.jobs, 2))
    env = env_info(torch.device("cpu"))
    env.update(target=f"cuda:{CAPABILITY}", triton_target_version=triton.__version__)
    run_id = uuid.uuid4().hex[:12]
    rows: list[dict] = []
    t0 = time.perf_counter()
    if not args.no_triton:
        filters = {
            key: {x for x in getattr(args, key).split(",") if x} or None
            for key in ("kernels", "dtypes", "cases", "fn_modes")
        }
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        for r in triton_rows(args.quick, jobs, log=log, pruned=args.pruned, **filters):
            rows.append({"part": "triton", **r})
    cuda_reason = None
    if not args.no_cuda:
        crows, cuda_reason = cuda_rows(log=lambda s: print(s, file=sys.stderr, flush=True))
        rows += crows
        if cuda_reason:
            print(f"cuda: skipped: {cuda_reason}", file=sys.stderr)
    for r in rows:
        r.update(schema=SCHEMA, bench="sm90_resources", run_id=run_id, quick=args.quick, env=env)
    if not args.no_write and rows:
        append_jsonl(args.out, rows)
        print(f"{len(rows)} rows appended to {args.out}", file=sys.stderr)
    print_tables(rows, all_configs=(args.table == "all") if args.table else not args.quick)
    live = [r for r in rows if r.get("role") != "pruned"]  # pruned configs never compile on a GPU for that variant
    bad = [r for r in live if r.get("status") == "error" or r.get("violations")]
    spills = [r for r in live if r.get("part") == "triton" and r.get("status") == "ok" and r["spill_stores"]]
    cuda_spills = [
        r for r in rows if r.get("part") == "cuda" and (r["stack_bytes"] or r["local_bytes"] or r["stl_instrs"])
    ]
    print(
        f"\n{len(rows)} rows in {time.perf_counter() - t0:.0f} s: {len(bad)} compile errors / limit violations "
        f"(pruned configs excluded), {len(spills)} Triton compiles with spills"
        + (f", {len(cuda_spills)} CUDA kernels with local memory" if not cuda_reason else "")
        + (f"; cuda skipped ({cuda_reason.splitlines()[0]})" if cuda_reason else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
