"""bench/gpu_check.sh without a GPU: `--dry-run` runs every phase in its CPU form and must leave exactly the
files the device tool can return; `--rerun` must restore the carried build and skip what already passed.
The device time is scarce (one ~8-minute call): a script that breaks there breaks where it cannot be fixed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_report  # noqa: E402

OUT_FILES = {"summary.json", "summary.txt", "table.md", "kernels.jsonl", "logs.tar.gz", "_C.abi3.so.gz",
             "triton_cache.tar.gz"}  # fmt: skip
MAX_FILES, MAX_BYTES = 8, 16 * 2**20  # what the device tool returns from $OUT

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.test_a" name="test_ok[cuda-float32]" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="x">boom</failure></testcase>
<testcase classname="tests.test_b.TestK" name="test_err" time="0.1"><error message="e">setup</error></testcase>
<testcase classname="tests.test_b" name="test_skip" time="0.0"><skipped message="no GPU"/></testcase>
<testcase classname="" name="tests.test_c" time="0.0"><error message="collection failure">E</error></testcase>
</testsuite></testsuites>"""


def test_junit_node_ids(tmp_path):
    path = tmp_path / "junit-x.xml"
    path.write_text(JUNIT)
    res = gpu_report.junit(path)
    assert (res["tests"], res["passed"], res["failed"], res["errors"], res["skipped"]) == (5, 1, 1, 2, 1)
    assert res["passed_ids"] == ["tests/test_a.py::test_ok[cuda-float32]"]
    assert res["failed_ids"] == ["tests/test_a.py::test_bad", "tests/test_b.py::TestK::test_err", "tests/test_c.py"]
    (tmp_path / "bad.xml").write_text("<testsuites><testcase")
    assert "unreadable" in gpu_report.junit(tmp_path / "bad.xml")


def _run(out: Path, work: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PY": sys.executable, "PROTOCLR_GIT_SHA": "test"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _check_out(out: Path, proc) -> dict:
    files = {p.name for p in out.iterdir()}
    assert files == OUT_FILES and len(files) <= MAX_FILES
    assert all(p.is_file() and p.stat().st_size <= MAX_BYTES for p in out.iterdir())
    summary = json.loads((out / "summary.json").read_text())
    # the table is printed last and fits the tool's output tail
    table = proc.stdout.rstrip().split("\n\n**protoclr gpu_check**")[-1]
    assert len(table.splitlines()) <= gpu_report.MAX_TABLE_LINES
    assert proc.stdout.rstrip().endswith((out / "table.md").read_text().rstrip().splitlines()[-1])
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(n).name for n in tar.getnames()}
    assert {"build.log", "pytest-cuda.log", "pytest-triton.log", "junit-cuda.xml", "junit-triton.xml", "bench.log",
            "smoke-cuda.jsonl"} <= logs  # fmt: skip
    return summary


def _collected(summary: dict, phase: str) -> tuple[int, int]:
    note = next(p["note"] for p in summary["phases"] if p["phase"] == phase)
    got, _, rest = note.partition(" tests collected (")
    return int(got.split("/")[0]), int(rest.split(" deselected")[0])


def test_dry_run_then_rerun(tmp_path):
    out, carry = tmp_path / "out", tmp_path / "carry"
    proc = _run(out, tmp_path / "work")
    s = _check_out(out, proc)
    phases = {p["phase"]: p["rc"] for p in s["phases"]}
    assert phases == {"toolchain": 0, "build": 0, "smoke-cuda": 0, "sanitizer-memcheck": 0, "tests-cuda": 0,
                      "tests-triton": 0, "bench": 0}  # fmt: skip
    assert s["smoke"]["cuda"]["cases"] >= 28 and not s["smoke"]["cuda"]["failed"]
    assert s["toolchain"]["torch"] and s["git_sha"] == "test"
    rows = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    assert {r["provider"] for r in rows if r["status"] == "ok"} >= {"cpu", "gemm"}
    n_cuda, desel = _collected(s, "tests-cuda")
    assert n_cuda > 50  # the cuda-backend parametrisations of the shared suites and tests/test_cuda_backend.py

    # --rerun: the carried _C is restored (into WORK on a dry run), tests that passed are deselected
    ids = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                          "-k", "cuda"], cwd=ROOT, capture_output=True, text=True).stdout  # fmt: skip
    passed = next(line for line in ids.splitlines() if "::" in line)
    shutil.copytree(out, carry)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "junit-cuda.xml").write_text(
        f'<testsuites><testsuite><testcase classname="{passed.split("::")[0][:-3].replace("/", ".")}" '
        f'name="{passed.split("::", 1)[1]}"/></testsuite></testsuites>'
    )
    with tarfile.open(carry / "logs.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "logs", arcname="logs")
    proc = _run(tmp_path / "out2", tmp_path / "work2", "--rerun", str(carry))
    s2 = _check_out(tmp_path / "out2", proc)
    assert s2["mode"] == "rerun+dry-run"
    assert {"sanitizer-racecheck", "sanitizer-synccheck"} <= {p["phase"] for p in s2["phases"]}
    assert (tmp_path / "work2" / "_C.abi3.so").stat().st_size > 1_000_000
    assert _collected(s2, "tests-cuda") == (n_cuda - 1, desel + 1)


def test_rerun_needs_a_folder(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--rerun", str(tmp_path / "missing")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and "--rerun needs the folder" in proc.stderr


@pytest.mark.parametrize("arg", ["--bogus"])
def test_unknown_flag(arg):
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), arg], capture_output=True, text=True)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
