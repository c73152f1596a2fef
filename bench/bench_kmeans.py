"""Benchmark protoclr.cluster.kmeans against faiss-cpu and scikit-learn (CPU) and the GEMM floor (CPU and GPU).

CPU (default): 100k x 256 rows, k = 512, every library on the same number of threads (--threads). All start
from the same initial centroids (our seeded k-means++), so they do identical Lloyd work; a Lloyd iteration's time
is (t(iters) - t(baseline)) / iters for each, which cancels set-up and the final assignment pass. faiss
(`faiss.Clustering`, what the official SPCL code clusters with) is optional: `pip install faiss-cpu`; without it
the row says why it is missing. k-means++ init is timed separately for ours and scikit-learn.
GPU (`--device cuda`): 1.28M x 256 rows, k = 3000 (the ImageNet preset), per-iteration time vs the GEMM
floor: one (N x D) @ (D x K) matmul, the E-step's unavoidable work, timed in fp32, TF32 and bf16 in the same run.

Appends one JSON line to bench/results/kmeans.jsonl (device, versions, git sha + dirty flag, sizes, threads,
wall and process-CPU times, inertias, ratios, load average at start and end) and logs it last. The variants are
timed round-robin; on a loaded machine compare the ratios within one run, and the CPU times (`*_cpu_s`), which
other processes disturb less than wall times.

    python bench/bench_kmeans.py                      # CPU, a few minutes on an idle 2-core machine
    python bench/bench_kmeans.py --device cuda        # GPU preset
    python bench/bench_kmeans.py --n 20000 --k 128    # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from protoclr import cluster, ops  # noqa: E402

log = logging.getLogger("bench_kmeans")

PRESETS = {"cpu": {"n": 100_000, "dim": 256, "k": 512}, "cuda": {"n": 1_280_000, "dim": 256, "k": 3000}}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("bench_kmeans", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where k-means runs (sets the preset)")
    p.add_argument("--n", type=int, default=None, help="rows N (default: 100000 on cpu, 1280000 on cuda)")
    p.add_argument("--dim", type=int, default=None, help="feature dimension D (default 256, the SPEC's PCA width)")
    p.add_argument("--k", type=int, default=None, help="clusters K (default: 512 on cpu, 3000 on cuda)")
    p.add_argument(
        "--iters", type=int, default=5, help="Lloyd iterations timed (SPEC trains with 20; fewer keeps this short)"
    )
    p.add_argument("--backend", default="auto", help="ops.assign backend for the E-step (auto|reference|cpu|...)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per timing, median kept (cpu 3, cuda 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the k-means++ init")
    p.add_argument(
        "--threads", type=int, default=None, help="threads of torch, faiss and scikit-learn (default: torch's)"
    )
    p.add_argument("--no-sklearn", action="store_true", help="skip scikit-learn (always skipped on cuda)")
    p.add_argument("--no-faiss", action="store_true", help="skip faiss-cpu (always skipped on cuda)")
    p.add_argument("--no-init", action="store_true", help="skip timing the k-means++ inits (sklearn's is slow)")
    p.add_argument(
        "--tf32",
        choices=["on", "off"],
        default="on",
        help="torch.backends.cuda.matmul.allow_tf32 for our k-means on cuda (the trainer turns TF32 on)",
    )
    p.add_argument("--out", default=None, help="JSON lines file (default bench/results/kmeans.jsonl)")
    return p


# ---------------------------------------------------------------------------------------------- helpers


def _git() -> tuple[str, bool]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=root, text=True).strip()
        dirty = bool(subprocess.check_output(["git", "status", "--porcelain"], cwd=root, text=True).strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of fn() in seconds (device synchronised), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _backend_name(requested: str, device: torch.device) -> str:
    """The ops.BACKENDS key that `requested` ("auto" included) resolves to on device."""
    module = ops.resolve(requested, device).__name__.rsplit(".", 1)[-1]
    names = [name for name, mod in ops.BACKENDS.items() if mod == module]
    return requested if requested in names else (device.type if device.type in names else names[0])


def _time_interleaved(fns: dict, device: torch.device, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median (wall, process CPU) seconds of each fn(), after one warm-up call each, measured round-robin: on a
    shared machine a change of load then hits every variant alike, which keeps the ratios within the run
    meaningful. CPU time counts every thread of this process and not the time other processes hold the cores."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn()
            _sync(device)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = lambda d: {name: statistics.median(v) for name, v in d.items()}
    return med(wall), med(cpu)


def _faiss():
    """The faiss module, or (None, why) when it is not installed."""
    try:
        import faiss
    except ImportError as e:
        return None, f"faiss-cpu is not installed ({e}); `pip install faiss-cpu` to compare with it"
    return faiss, None


def _faiss_fit(faiss, x: torch.Tensor, init: torch.Tensor, niter: int):
    """faiss.Clustering from the centroids init, on every row (no subsampling), niter Lloyd iterations.
    iteration_stats[i].obj is the inertia of iteration i's assignment, before its update."""
    n, d = x.shape
    k = init.size(0)
    clus = faiss.Clustering(d, k)
    clus.niter = niter
    clus.max_points_per_centroid = n // k + 1  # faiss would otherwise train on a sample of 256 rows per centroid
    clus.verbose = False
    faiss.copy_array_to_vector(init.numpy().ravel(), clus.centroids)  # given centroids are the init
    clus.train(x.numpy(), faiss.IndexFlatL2(d))
    return clus


def _data(n: int, dim: int, k: int, seed: int, device: torch.device) -> torch.Tensor:
    """(n, dim) float32 L2-normalised rows around 2k random centres, like whitened SPCL features."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(2 * k, dim, generator=g, device=device)
    lab = torch.randint(0, 2 * k, (n,), generator=g, device=device)
    x = centres[lab] + 1.5 * torch.randn(n, dim, generator=g, device=device)
    return torch.nn.functional.normalize(x, dim=1)


def _gemm_floor(x: torch.Tensor, k: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of one (N x D) @ (D x K) matmul, the E-step's floor, per precision available on the device."""
    c = torch.randn(k, x.size(1), device=device)
    out = {}
    modes = [("fp32", torch.float32, False)]
    if device.type == "cuda":
        modes += [("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)]
    prev = torch.backends.cuda.matmul.allow_tf32
    for name, dtype, tf32 in modes:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = x.to(dtype), c.to(dtype).T.contiguous()
        out[name] = _time(lambda a=a, b=b: a @ b, device, repeats)
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = prev
    return out


# ------------------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its per-ISA module attempts, not failures
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    preset = PRESETS[device.type]
    n, dim, k = args.n or preset["n"], args.dim or preset["dim"], args.k or preset["k"]
    for name, v in (("--n", n), ("--dim", dim), ("--k", k), ("--iters", args.iters)):
        if v < 1:
            raise SystemExit(f"{name} must be >= 1, got {v}")
    repeats = args.repeats or (3 if device.type == "cpu" else 5)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    faiss, faiss_missing = (None, "skipped (--no-faiss)") if args.no_faiss else _faiss()
    if device.type == "cuda":
        faiss, faiss_missing = None, "skipped on cuda (faiss-cpu)"
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
        faiss_build = faiss.get_compile_options()  # "DD AVX2 AVX512 ...": SIMD picked at run time
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    backend_used = _backend_name(args.backend, device)
    log.info(
        "kmeans bench: N=%d D=%d K=%d iters=%d on %s, assign backend %s (%s), %d threads, load %.2f",
        n, dim, k, args.iters, device, args.backend, backend_used, threads, os.getloadavg()[0],
    )  # fmt: skip
    if faiss is None:
        log.info("faiss: %s", faiss_missing)

    x = _data(n, dim, k, args.seed, device)
    res: dict = {"loadavg_1m_start": os.getloadavg()[0]}

    # ---- k-means++ inits, timed once each (seconds long); ours also gives the shared init c0
    t = time.perf_counter()
    c0, _, inertia0 = cluster.kmeans(x, k, iters=0, seed=args.seed, backend=args.backend)
    _sync(device)
    t_ours_pp = time.perf_counter() - t  # k-means++ + one E-step; the E-step is subtracted below
    use_sklearn = device.type == "cpu" and not args.no_sklearn
    if use_sklearn:
        import sklearn
        from sklearn.cluster import KMeans

        xn, cn = x.numpy(), c0.numpy()

        def fit(max_iter, init=cn):
            return KMeans(k, init=init, n_init=1, max_iter=max_iter, tol=0.0, algorithm="lloyd").fit(xn)

        if not args.no_init:
            t = time.perf_counter()
            fit(1, init="k-means++")
            t_sk_pp = time.perf_counter() - t  # k-means++ + one Lloyd step; the step is subtracted below

    # ---- Lloyd iterations from the same init, round-robin so that load changes hit every variant alike
    bias = -0.5 * c0.pow(2).sum(1)
    fns = {
        "ours_base": lambda: cluster.kmeans(x, k, iters=0, init=c0, backend=args.backend),
        "ours_full": lambda: cluster.kmeans(x, k, iters=args.iters, init=c0, backend=args.backend),
    }
    # E-step alone on every backend usable here (a new backend is measured with no edit).
    for name in ops.BACKENDS:
        try:
            ops.resolve(name, device)
        except (RuntimeError, ValueError) as e:
            log.info("E-step on %s: skipped (%s)", name, str(e).split(";")[0])
            continue
        fns[f"estep_{name}"] = lambda name=name: ops.assign(x, c0, bias, backend=name)
    if use_sklearn:
        fns["sk_1"] = lambda: fit(1)
        fns["sk_full"] = lambda: fit(args.iters + 1)
    if faiss is not None:
        fns["faiss_1"] = lambda: _faiss_fit(faiss, x, c0, 1)
        fns["faiss_full"] = lambda: _faiss_fit(faiss, x, c0, args.iters + 1)
    if device.type == "cpu":
        cT = c0.T.contiguous()
        fns["gemm_fp32"] = lambda: x @ cT
    if use_sklearn:
        from threadpoolctl import threadpool_limits  # a scikit-learn dependency

        with threadpool_limits(limits=threads):  # scikit-learn's OpenMP and every BLAS on `threads` threads
            tm, tc = _time_interleaved(fns, device, repeats)
    else:
        tm, tc = _time_interleaved(fns, device, repeats)
    per_iter = lambda t, base, full: (t[full] - t[base]) / args.iters

    _, _, inertia_ours = cluster.kmeans(x, k, iters=args.iters, init=c0, backend=args.backend)
    res["ours"] = {
        "iter_s": per_iter(tm, "ours_base", "ours_full"),
        "iter_cpu_s": per_iter(tc, "ours_base", "ours_full"),
        "estep_s": tm[f"estep_{backend_used}"],
        "estep_by_backend_s": {name[6:]: v for name, v in tm.items() if name.startswith("estep_")},
        "kmeanspp_s": None if args.no_init else max(t_ours_pp - tm["ours_base"], 0.0),
        "inertia_init": inertia0,
        "inertia": inertia_ours,
    }
    if device.type == "cuda":
        res["ours"]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if use_sklearn:
        km = fit(args.iters)  # max_iter Lloyd steps + a final assignment: the same work as ours with iters
        sk = {"version": sklearn.__version__, "iter_s": per_iter(tm, "sk_1", "sk_full")}
        sk["iter_cpu_s"] = per_iter(tc, "sk_1", "sk_full")
        sk["n_iter"], sk["inertia"] = int(km.n_iter_), float(km.inertia_)
        sk["kmeanspp_s"] = None if args.no_init else max(t_sk_pp - tm["sk_1"], 0.0)
        res["sklearn"] = sk
        res["ratio_sklearn_over_ours"] = sk["iter_s"] / res["ours"]["iter_s"]
        res["inertia_rel_diff_sklearn"] = inertia_ours / sk["inertia"] - 1
    if faiss is not None:
        clus = _faiss_fit(faiss, x, c0, args.iters + 1)  # the last iteration's objective: ours after iters
        fa = {"version": faiss.__version__, "build": faiss_build, "threads": faiss.omp_get_max_threads()}
        fa["iter_s"], fa["iter_cpu_s"] = per_iter(tm, "faiss_1", "faiss_full"), per_iter(tc, "faiss_1", "faiss_full")
        fa["inertia"] = float(clus.iteration_stats.at(args.iters).obj)
        res["faiss"] = fa
        res["ratio_ours_over_faiss"] = res["ours"]["iter_s"] / fa["iter_s"]  # the target is <= 1
        res["ratio_ours_over_faiss_cpu"] = res["ours"]["iter_cpu_s"] / fa["iter_cpu_s"]
        res["inertia_rel_diff_faiss"] = inertia_ours / fa["inertia"] - 1
    else:
        res["faiss"] = {"missing": faiss_missing}

    # ---- GEMM floor: one (N x D) @ (D x K) product
    gemm = {"fp32": tm["gemm_fp32"]} if device.type == "cpu" else _gemm_floor(x, k, device, repeats)
    res["gemm_s"] = gemm
    floor = min(gemm.values())
    res["ratio_iter_over_gemm"] = res["ours"]["iter_s"] / floor
    res["ratio_estep_over_gemm"] = res["ours"]["estep_s"] / floor
    res["gemm_tflops"] = {name: 2 * n * dim * k / s / 1e12 for name, s in gemm.items()}

    res["loadavg_1m_end"] = os.getloadavg()[0]  # > cores: other work shared the CPUs during this run
    sha, dirty = _git()
    row = {
        "bench": "kmeans",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "torch": torch.__version__,
        "git_sha": sha,
        "git_dirty": dirty,
        "threads": threads,
        "n": n,
        "dim": dim,
        "k": k,
        "iters": args.iters,
        "repeats": repeats,
        "backend": args.backend,
        "backend_used": backend_used,
        "tf32": args.tf32 == "on" if device.type == "cuda" else None,
        **res,
    }
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "kmeans.jsonl")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")

    o = res["ours"]
    log.info("%-28s %10s", "quantity", "value")
    log.info("%-28s %9.1f ms (CPU %.1f ms)", "ours: Lloyd iteration", 1e3 * o["iter_s"], 1e3 * o["iter_cpu_s"])
    log.info("%-28s %9.1f ms", "ours: E-step (ops.assign)", 1e3 * o["estep_s"])
    for name, sec in o["estep_by_backend_s"].items():
        log.info("%-28s %9.1f ms", f"  E-step backend {name}", 1e3 * sec)
    if o["kmeanspp_s"] is not None:
        log.info("%-28s %9.2f s", "ours: k-means++ init", o["kmeanspp_s"])
    if "iter_s" in res["faiss"]:
        fa = res["faiss"]
        log.info("%-28s %9.1f ms (CPU %.1f ms)", "faiss: Lloyd iteration", 1e3 * fa["iter_s"], 1e3 * fa["iter_cpu_s"])
        log.info("%-28s %9.2f x (CPU %.2f x)", "ours / faiss per iter", res["ratio_ours_over_faiss"],
                 res["ratio_ours_over_faiss_cpu"])  # fmt: skip
        log.info("%-28s %.6g vs %.6g", "inertia ours vs faiss", o["inertia"], fa["inertia"])
    if "sklearn" in res:
        sk = res["sklearn"]
        log.info("%-28s %9.1f ms (CPU %.1f ms)", "sklearn: Lloyd iteration", 1e3 * sk["iter_s"], 1e3 * sk["iter_cpu_s"])
        if res["sklearn"]["kmeanspp_s"] is not None:
            log.info("%-28s %9.2f s", "sklearn: k-means++ init", res["sklearn"]["kmeanspp_s"])
        log.info("%-28s %9.2f x", "sklearn / ours per iter", res["ratio_sklearn_over_ours"])
        log.info("%-28s %.6g vs %.6g", "inertia ours vs sklearn", o["inertia"], res["sklearn"]["inertia"])
    for name, s in gemm.items():
        log.info("%-28s %9.1f ms", f"GEMM floor {name}", 1e3 * s)
    log.info("%-28s %9.2f x", "iteration / fastest GEMM", res["ratio_iter_over_gemm"])
    log.info("%-28s %.2f -> %.2f", "load average (1 min)", res["loadavg_1m_start"], res["loadavg_1m_end"])
    log.info(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
