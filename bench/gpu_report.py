"""The bookkeeping of bench/gpu_check.sh: toolchain record, phase log, failed-test list, JSON summary and the
short table printed last. No torch import except in `toolchain`, so every other call costs a fraction of a second.

    python bench/gpu_report.py toolchain --work W            # W/toolchain.json + human lines on stdout
    python bench/gpu_report.py phase --work W NAME RC SECONDS [NOTE]
    python bench/gpu_report.py ids [--passed] JUNIT.xml...    # node ids of failed (passed) tests, one per line
    python bench/gpu_report.py summary --work W --out O [--print]   # O/summary.json, O/table.md (+ stdout)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
MAX_TABLE_LINES = 40


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({type(e).__name__})"


def _first_match(patterns: list[str]) -> list[str]:
    found = []
    for pat in patterns:
        found += sorted(glob.glob(pat, recursive=True))
    return found[:4]


# ---------------------------------------------------------------------------------------------- toolchain


def toolchain() -> dict:
    """What a failed build needs to be understood: which compiler, toolkit, runtime and headers were seen."""
    import sysconfig

    info: dict = {"python": sys.executable}
    try:
        import torch
        import triton
        from torch.utils import cpp_extension

        info.update(
            torch=torch.__version__, torch_cuda=torch.version.cuda, triton=triton.__version__,
            gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            torch_cuda_home=cpp_extension.CUDA_HOME,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001  (recorded: the build log will say more)
        info["torch_error"] = f"{type(e).__name__}: {e}"
    nvcc = shutil.which("nvcc")
    info["nvcc_on_path"] = nvcc
    info["nvcc_realpath"] = os.path.realpath(nvcc) if nvcc else None
    ver = _run(["nvcc", "--version"]) if nvcc else ""
    info["nvcc_version"] = (re.findall(r"release [0-9.]+, V[0-9.]+", ver) or [ver[-120:] or None])[0]
    info["CUDA_HOME"] = os.environ.get("CUDA_HOME")
    homes = [h for h in [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))] if h]
    info["toolkit_roots"] = [h for h in dict.fromkeys(homes) if os.path.isfile(os.path.join(h, "bin", "nvcc"))]
    purelib = sysconfig.get_paths()["purelib"]
    roots = info["toolkit_roots"] + [os.path.join(purelib, "nvidia")]
    info["cusparse_h"] = _first_match([f"{r}/**/cusparse.h" for r in roots] + ["/usr/include/cusparse.h"])
    info["libcudart"] = _first_match(
        [f"{r}/lib64/libcudart.so*" for r in info["toolkit_roots"]]
        + [f"{purelib}/nvidia/**/libcudart.so*", f"{purelib}/torch/lib/libcudart*.so*"]
    )
    info["compute_sanitizer"] = shutil.which("compute-sanitizer") or next(
        (p for r in info["toolkit_roots"] for p in [os.path.join(r, "bin", "compute-sanitizer")] if os.path.isfile(p)),
        None,
    )
    info["gcc"] = _run(["gcc", "-dumpfullversion"]) if shutil.which("gcc") else None
    info["ninja"] = _run(["ninja", "--version"]) if shutil.which("ninja") else None
    smi = shutil.which("nvidia-smi")
    info["nvidia_smi"] = (
        _run([smi, "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"])
        if smi
        else None
    )
    info["env"] = {
        k: os.environ.get(k)
        for k in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "TRITON_CACHE_DIR", "PROTOCLR_TRITON_AUTOTUNE")
    }
    return info


# ---------------------------------------------------------------------------------------------- phases


def add_phase(work: Path, name: str, rc: int, seconds: int, note: str = "") -> None:
    with open(work / "phases.jsonl", "a") as f:
        f.write(json.dumps({"phase": name, "rc": rc, "seconds": seconds, "note": note, "t": time.time()}) + "\n")


def _jsonl(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# ---------------------------------------------------------------------------------------------- junit


def junit(path: Path) -> dict:
    """Counts and failed node ids of one junit XML (pytest's)."""
    res = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failed_ids": [], "passed_ids": []}
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        return {**res, "unreadable": f"{type(e).__name__}: {e}"}
    for case in root.iter("testcase"):
        res["tests"] += 1
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            res["failed" if "failure" in kinds else "errors"] += 1
            res["failed_ids"].append(_node_id(case))
        elif "skipped" in kinds:
            res["skipped"] += 1
        else:
            res["passed"] += 1
            res["passed_ids"].append(_node_id(case))
    return res


def _node_id(case) -> str:
    """pytest's node id from a junit testcase: classname tests.test_x[.TestClass], name test_f[params]."""
    if not case.get("classname"):  # a collection error: the name is the module
        return case.get("name", "").replace(".", "/") + ".py"
    parts = case.get("classname").split(".")
    k = next((i for i, p in enumerate(parts) if p.startswith("test_")), len(parts) - 1)
    return "/".join(parts[: k + 1]) + ".py" + "".join(f"::{c}" for c in parts[k + 1 :]) + f"::{case.get('name')}"


# ---------------------------------------------------------------------------------------------- summary


def _sanitizer(log: Path) -> dict | None:
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return {
        "errors": int(m[-1]) if m else None,
        "log": log.name,
        "first_error": next(
            (line.strip() for line in text.splitlines() if line.startswith("========= ") and "rror" in line), None
        ),
    }


def summarize(work: Path, out: Path) -> tuple[dict, str]:
    sys.path.insert(0, str(BENCH))
    import table  # bench/table.py: the targets of the kernel benchmark

    phases = _jsonl(work / "phases.jsonl")
    meta = json.loads((work / "meta.json").read_text()) if (work / "meta.json").exists() else {}
    tests = {p.stem.removeprefix("junit-"): junit(p) for p in sorted((work / "logs").glob("junit-*.xml"))}
    smoke = {p.stem.removeprefix("smoke-"): _jsonl(p) for p in sorted((work / "logs").glob("smoke-*.jsonl"))}
    sanitizers = {p.stem: _sanitizer(p) for p in sorted((work / "logs").glob("sanitizer-*.log"))}
    bench_rows = table.read_jsonl(out / "kernels.jsonl")
    summary = {
        "schema": 1,
        **meta,
        "elapsed_s": round(time.time() - meta.get("t0", time.time())),
        "toolchain": json.loads((work / "toolchain.json").read_text()) if (work / "toolchain.json").exists() else {},
        "phases": phases,
        "tests": tests,
        "smoke": {
            k: {
                "ok": sum(r.get("ok", False) for r in v),
                "cases": len(v),
                "failed": [
                    f"{r['dtype']} {r['case']}: {r.get('error') or r.get('rel_err')}" for r in v if not r.get("ok")
                ],
            }
            for k, v in smoke.items()
        },
        "sanitizers": sanitizers,
        "bench_rows": len(bench_rows),
        "targets": table.render_targets(bench_rows) if bench_rows else "",
        "files": sorted(p.name for p in out.iterdir() if p.is_file() and p.name != "summary.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    text = render(summary, bench_rows)
    (out / "table.md").write_text(text + "\n")
    return summary, text


def render(s: dict, bench_rows: list[dict]) -> str:
    """The ≤ 40-line report: one row per phase, the issue targets, the first failures."""
    tc = s.get("toolchain", {})
    lines = [
        f"**protoclr gpu_check** ({s.get('mode')}) {tc.get('gpu') or 'no GPU'} | torch {tc.get('torch')} | "
        f"triton {tc.get('triton')} | nvcc {tc.get('nvcc_version')} | git {str(s.get('git_sha'))[:10]} | "
        f"{s.get('elapsed_s')} s",
        "",
        "| phase | rc | s | result |",
        "|---|---|---|---|",
    ]
    for p in s["phases"]:
        name = p["phase"]
        result = p.get("note", "")
        if name.startswith("tests-") and not result and name.removeprefix("tests-") in s["tests"]:
            t = s["tests"][name.removeprefix("tests-")]  # pytest's own summary line is the note when it printed one
            result = f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
        elif name.startswith("smoke-") and name.removeprefix("smoke-") in s["smoke"]:
            sm = s["smoke"][name.removeprefix("smoke-")]
            result = f"{sm['ok']}/{sm['cases']} cases ok" + (f"; {result}" if result else "")
        elif name.startswith("sanitizer-") and s["sanitizers"].get(name):
            san = s["sanitizers"][name]
            if san["errors"] is not None:
                result = f"{san['errors']} errors" + (f": {san['first_error'][:80]}" if san.get("first_error") else "")
        lines.append(f"| {name} | {p['rc']} | {p['seconds']} | {result[:110].replace('|', '/')} |")
    if s.get("targets"):
        lines += ["", s["targets"]]
    probe = (bench_rows[0].get("matmul_probe") if bench_rows else None) or {}
    if probe:
        lines.append(f"matmul probe {probe.get('dtype')}: {probe.get('tflops', 0):.3g} TFLOP/s")
    failures = [f"FAILED {i}" for t in s["tests"].values() for i in t["failed_ids"]]
    failures += [f"SMOKE {k}: {f}" for k, v in s["smoke"].items() for f in v["failed"]]
    room = MAX_TABLE_LINES - len(lines) - 2
    if failures and room > 0:
        lines += [""] + [f[:150] for f in failures[:room]]
        if len(failures) > room:
            lines.append(f"... {len(failures) - room} more in summary.json")
    return "\n".join(lines[:MAX_TABLE_LINES])


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toolchain", help="record the toolchain in WORK/toolchain.json")
    t.add_argument("--work", type=Path, required=True)
    ph = sub.add_parser("phase", help="append one phase's outcome to WORK/phases.jsonl")
    ph.add_argument("--work", type=Path, required=True)
    ph.add_argument("name")
    ph.add_argument("rc", type=int)
    ph.add_argument("seconds", type=int)
    ph.add_argument("note", nargs="?", default="")
    f = sub.add_parser("ids", help="node ids of the failed (or --passed) tests in junit XML files")
    f.add_argument("--passed", action="store_true")
    f.add_argument("junit", nargs="+", type=Path)
    s = sub.add_parser("summary", help="write OUT/summary.json and OUT/table.md")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--print", action="store_true", help="print the table")
    args = p.parse_args(argv)
    if args.cmd == "toolchain":
        info = toolchain()
        (args.work / "toolchain.json").write_text(json.dumps(info, indent=1) + "\n")
        for k in ("gpu", "nvidia_smi", "torch", "torch_cuda", "triton", "nvcc_on_path", "nvcc_realpath",
                  "nvcc_version", "CUDA_HOME", "torch_cuda_home", "toolkit_roots", "libcudart", "cusparse_h",
                  "compute_sanitizer", "gcc", "ninja"):  # fmt: skip
            print(f"toolchain {k}: {info.get(k)}")
    elif args.cmd == "phase":
        add_phase(args.work, args.name, args.rc, args.seconds, args.note)
    elif args.cmd == "ids":
        for path in args.junit:
            for node in junit(path)["passed_ids" if args.passed else "failed_ids"]:
                print(node)
    else:
        _, text = summarize(args.work, args.out)
        if args.print:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
