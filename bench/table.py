"""Markdown tables from bench/results/*.jsonl: the kernel benchmark of one run, its largest-N probe and the
issue targets (ratios within one run, as SPEC §5 asks).

    python bench/table.py                                # latest run per device in bench/results/
    python bench/table.py bench/results/kernels_cpu.jsonl --run all
    python bench/table.py $OUT/kernels.jsonl --targets-only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

OP_ORDER = {"contrastive": 0, "siamese": 1, "assign": 2}
PROVIDER_ORDER = {
    "cuda": 0, "triton": 1, "triton-sym": 2, "cpu": 3, "reference": 4, "compile": 5, "cdist": 6, "inf-cl": 7, "gemm": 8,
}  # fmt: skip
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def read_jsonl(paths) -> list[dict]:
    """Rows of every file (or every *.jsonl under a directory); unreadable lines are skipped."""
    rows = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = Path(path)
        files = sorted(p.glob("*.jsonl")) if p.is_dir() else [p] if p.exists() else []
        for f in files:
            with open(f) as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    return rows


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _porder(p: str) -> int:
    return PROVIDER_ORDER.get(p, 9)


def _num(x, fmt: str, none: str = "") -> str:
    return format(x, fmt) if finite(x) else none


def latest_runs(rows: list[dict]) -> list[dict]:
    """Rows of the most recent kernels run of each device kind (run ids start with a UTC timestamp)."""
    last: dict[str, str] = {}
    for r in rows:
        if r.get("bench") != "kernels":
            continue
        key = f"{r.get('device')}|{(r.get('env') or {}).get('device_name')}"
        if r["run_id"] > last.get(key, ""):
            last[key] = r["run_id"]
    keep = set(last.values())
    return [r for r in rows if r.get("run_id") in keep]


def _ok_cases(rows):
    return [r for r in rows if r.get("type") == "case" and r.get("status") == "ok"]


def _index(rows) -> dict:
    """(run, op, dtype, n, d, k, mode, provider) -> row."""
    return {
        (r["run_id"], r["op"], r["dtype"], r["n"], r["d"], r.get("k"), r["mode"], r["provider"]): r
        for r in _ok_cases(rows)
    }


def render_cases(rows: list[dict]) -> str:
    idx = _index(rows)
    cases = sorted(
        _ok_cases(rows),
        key=lambda r: (
            r["run_id"],
            OP_ORDER.get(r["op"], 9),
            r["dtype"],
            r["d"],
            r["n"],
            r["mode"],
            _porder(r["provider"]),
        ),
    )
    if not cases:
        return "(no measured cases)"
    gpu = any(r.get("device") == "cuda" for r in cases)
    head = (
        "| op | dtype | N | D | mode | provider | ms | TFLOP/s | "
        + ("% bf16 mm | " if gpu else "")
        + "peak extra MB | × ref | × compile |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in cases:
        key = (r["run_id"], r["op"], r["dtype"], r["n"], r["d"], r.get("k"), r["mode"])
        ref, comp = idx.get((*key, "reference")), idx.get((*key, "compile"))
        x_ref = ref["median_ms"] / r["median_ms"] if ref and r["provider"] != "reference" else None
        x_comp = comp["median_ms"] / r["median_ms"] if comp and r["provider"] != "compile" else None
        d = f"{r['d']}" + (f" K={r['k']}" if r.get("k") else "")
        mem = r.get("peak_extra_bytes")
        cells = [
            r["op"],
            DTYPE_SHORT.get(r["dtype"], r["dtype"]),
            str(r["n"]),
            d,
            r["mode"],
            r["provider"],
            _num(r["median_ms"], ".3f" if r["median_ms"] < 100 else ".1f"),
            _num(r["tflops"], ".3g" if r["tflops"] < 1 else ".1f"),
        ]
        if gpu:
            cells.append(_num(100 * (r.get("frac_matmul") or float("nan")), ".1f"))
        cells += [_num(mem / 2**20 if mem is not None else None, ".1f"), _num(x_ref, ".2f"), _num(x_comp, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_skips(rows: list[dict]) -> str:
    """Cases that did not run, one line per (provider, status, reason): the ops and sizes it covers."""
    groups: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r.get("type") == "case" and r.get("status") != "ok":
            reason = r.get("reason") or ""
            if "(est." in reason:  # the estimate differs per N; one line per provider and op
                reason = reason.split(" (est.")[0] + " (estimated)"
            groups[(r["provider"], r["status"], reason)].append(r)
    if not groups:
        return ""
    out = ["Not measured:"]
    for (pv, status, reason), rs in sorted(groups.items(), key=lambda kv: (_porder(kv[0][0]), kv[0][1:])):
        where = []
        for op in sorted({r["op"] for r in rs}, key=lambda o: OP_ORDER.get(o, 9)):
            cases = sorted({(r["n"], r["mode"]) for r in rs if r["op"] == op and r.get("n")})
            modes = sorted({m for _, m in cases})
            ns = ",".join(str(n) for n in sorted({n for n, _ in cases}))
            where.append(op + (f" N={ns}" if ns else "") + (f" ({'/'.join(modes)})" if len(modes) == 1 else ""))
        out.append(f"- {pv} {'; '.join(where)}: {status}: {reason[:160]}")
    return "\n".join(out)


def render_max_n(rows: list[dict]) -> str:
    ps = [r for r in rows if r.get("type") == "max_n"]
    if not ps:
        return ""
    lines = [
        "| op | dtype | D | provider | largest N run (fwd+bwd) | ms there | peak extra MB | stopped by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(ps, key=lambda r: (OP_ORDER.get(r["op"], 9), _porder(r["provider"]))):
        mem = r.get("max_n_peak_extra_bytes")
        lines.append(
            f"| {r['op']} | {DTYPE_SHORT.get(r['dtype'], r['dtype'])} | {r['d']} | {r['provider']} | "
            f"{r.get('max_n') or '-'} | {_num(r.get('max_n_ms'), '.1f')} | "
            f"{_num(mem / 2**20 if mem is not None else None, '.0f')} | {(r.get('reason') or '')[:90]} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- targets


def _find(idx, run, op, dtype, n, d, mode, provider):
    for key, r in idx.items():
        if (
            key[0] == run
            and key[1] == op
            and (dtype is None or key[2] == dtype)
            and key[3] == n
            and key[4] == d
            and key[6] == mode
            and key[7] == provider
        ):
            return r
    return None


def _extrapolated(idx, run, op, dtype, n, d, mode, provider):
    """(ms, note): `provider` at size n, measured, else scaled by N² from its largest measured N."""
    r = _find(idx, run, op, dtype, n, d, mode, provider)
    if r:
        return r["median_ms"], "measured"
    cands = [
        v
        for k, v in idx.items()
        if k[0] == run
        and k[1] == op
        and (dtype is None or k[2] == dtype)
        and k[4] == d
        and k[6] == mode
        and k[7] == provider
    ]
    if not cands:
        return None, None
    big = max(cands, key=lambda v: v["n"])
    return big["median_ms"] * (n / big["n"]) ** 2, f"extrapolated ×(N/{big['n']})² from N={big['n']}"


def render_targets(rows: list[dict]) -> str:
    """The issue 3 (CPU) and issue 9 (GPU) targets, per non-reference backend found in each run."""
    idx = _index(rows)
    out = ["| target | backend | measured | goal | met |", "|---|---|---|---|---|"]
    runs = sorted({r["run_id"] for r in _ok_cases(rows)})
    for run in runs:
        rr = [r for r in _ok_cases(rows) if r["run_id"] == run]
        dev = rr[0]["device"]
        backends = sorted(
            {r["provider"] for r in rr if r["kind"] == "backend" and r["provider"] != "reference"}, key=_porder
        )
        for b in backends:
            if dev == "cpu":
                # fwd+bwd >= 2x reference eager at contrastive N=4096 D=128
                a, ref = (_find(idx, run, "contrastive", None, 4096, 128, "fwd_bwd", p) for p in (b, "reference"))
                if a and ref:
                    x = ref["median_ms"] / a["median_ms"]
                    out.append(
                        f"| contrastive fwd+bwd N=4096 D=128 vs reference | {b} | {x:.2f}× | ≥ 2× | {_yes(x >= 2)} |"
                    )
                # peak extra memory at N=8192 <= 5% of the reference's
                a, ref = (_find(idx, run, "contrastive", None, 8192, 128, "fwd_bwd", p) for p in (b, "reference"))
                if a and ref and a.get("peak_extra_bytes") is not None and ref.get("peak_extra_bytes"):
                    f = a["peak_extra_bytes"] / ref["peak_extra_bytes"]
                    out.append(
                        f"| contrastive fwd+bwd N=8192 peak extra memory / reference's | {b} | "
                        f"{100 * f:.2f}% ({a['peak_extra_bytes'] / 2**20:.1f} MB vs "
                        f"{ref['peak_extra_bytes'] / 2**20:.0f} MB) | ≤ 5% | {_yes(f <= 0.05)} |"
                    )
                for mode in ("fwd_bwd", "fwd"):
                    a, ref = (_find(idx, run, "siamese", None, 1024, 512, mode, p) for p in (b, "reference"))
                    if a and ref:
                        x = ref["median_ms"] / a["median_ms"]
                        goal = "≥ 3×" if mode == "fwd_bwd" else "(info)"
                        met = _yes(x >= 3) if mode == "fwd_bwd" else ""
                        out.append(
                            f"| siamese dense {mode.replace('_', '+')} N=1024 Dh=512 vs reference | {b} | "
                            f"{x:.2f}× | {goal} | {met} |"
                        )
            else:
                a = _find(idx, run, "contrastive", "bfloat16", 65536, 128, "fwd_bwd", b)
                if a and a.get("frac_matmul") is not None:
                    f = a["frac_matmul"]
                    out.append(
                        f"| contrastive fwd+bwd N=65536 D=128 bf16, share of bf16 matmul rate | {b} | "
                        f"{100 * f:.1f}% ({a['tflops']:.0f} TFLOP/s) | ≥ 60% | {_yes(f >= 0.6)} |"
                    )
                a = _find(idx, run, "siamese", None, 16384, 2048, "fwd_bwd", b)
                if a:
                    ms, note = _extrapolated(idx, run, "siamese", a["dtype"], 16384, 2048, "fwd_bwd", "compile")
                    if ms is not None:
                        x = ms / a["median_ms"]
                        out.append(
                            f"| siamese dense fwd+bwd N=16384 Dh=2048 vs torch.compile(reference) | {b} | "
                            f"{x:.1f}× (compile {note}) | ≥ 5× | {_yes(x >= 5)} |"
                        )
                    else:
                        out.append(
                            f"| siamese dense fwd+bwd N=16384 Dh=2048 vs torch.compile(reference) | {b} | "
                            f"no compile baseline measured | ≥ 5× | ? |"
                        )
                a = _find(idx, run, "assign", None, 1281167, 256, "fwd", b)
                gemm = _find(idx, run, "assign", a["dtype"] if a else None, 1281167, 256, "fwd", "gemm")
                if a and gemm:
                    x = a["median_ms"] / gemm["median_ms"]
                    out.append(
                        f"| assign M=1281167 D=256 K={a.get('k')} {a['dtype']}, time / GEMM floor (x @ cᵀ) | {b} | "
                        f"{x:.2f}× ({a['median_ms']:.2f} vs {gemm['median_ms']:.2f} ms) | ≤ 2× | {_yes(x <= 2)} |"
                    )
    return "\n".join(out) if len(out) > 2 else ""


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(rows: list[dict], targets_only: bool = False) -> str:
    """The whole report for `rows` (usually one run): cases, what was not measured, max-N, targets."""
    parts = []
    if rows:
        env = rows[0].get("env") or {}
        probe = rows[0].get("matmul_probe") or {}
        parts.append(
            f"**{env.get('device_name')}** ({rows[0].get('device')}), torch {env.get('torch')}, triton "
            f"{env.get('triton')}, git {str(env.get('git_sha'))[:10]}{'+dirty' if env.get('git_dirty') else ''}, "
            f"{env.get('date')}, {env.get('threads')} threads; matmul probe {probe.get('dtype')} "
            f"{_num(probe.get('tflops'), '.3g')} TFLOP/s"
        )
    if not targets_only:
        parts.append(render_cases(rows))
        for extra in (render_max_n(rows), render_skips(rows)):
            if extra:
                parts.append(extra)
    t = render_targets(rows)
    if t:
        parts.append("Targets:\n\n" + t)
    return "\n\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=[str(RESULTS)], help="JSONL files or directories")
    p.add_argument("--run", default="latest", help="'latest' (per device), 'all', or a run_id")
    p.add_argument("--targets-only", action="store_true")
    args = p.parse_args(argv)
    rows = [r for r in read_jsonl(args.paths) if r.get("bench") == "kernels"]
    if args.run == "latest":
        rows = latest_runs(rows)
    elif args.run != "all":
        rows = [r for r in rows if r.get("run_id") == args.run]
    by_run: dict[str, list] = defaultdict(list)
    for r in rows:
        by_run[r["run_id"]].append(r)
    print("\n\n".join(render(rs, args.targets_only) for _, rs in sorted(by_run.items())) or "(no rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
