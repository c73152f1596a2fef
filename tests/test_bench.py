"""Smoke test of the benchmark's CPU path: kernels.py runs on tiny sizes and appends valid JSON lines;
table.py renders them. No timing is asserted (STYLE: speed is measured in bench/, never tested)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_cpu_quick_writes_jsonl(tmp_path):
    out = tmp_path / "k.jsonl"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "kernels.py"),
        "--device",
        "cpu",
        "--quick",
        "--ops",
        "contrastive",
        "--providers",
        "reference,triton",
        "--size",
        "contrastive:48",
        "--out",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ok = [x for x in rows if x["status"] == "ok"]
    assert {(x["provider"], x["mode"]) for x in ok} == {("reference", "fwd"), ("reference", "fwd_bwd")}
    for x in ok:
        assert x["n"] == 48 and x["d"] == 16 and x["median_ms"] > 0 and x["reps"] >= 1
        assert x["flops"] == (2 if x["mode"] == "fwd" else 8) * 48 * 48 * 16
        assert x["peak_extra_bytes"] is not None and x["mem_method"].startswith("rss")
        assert x["env"]["git_sha"] and x["env"]["torch"] and x["run_id"] and x["matmul_probe"]["tflops"] > 0
    skipped = [x for x in rows if x["provider"] == "triton"]
    assert skipped and skipped[0]["status"] == "skipped" and "interpreter" in skipped[0]["reason"]
    assert "| contrastive | fp32 | 48 |" in r.stdout  # the table is printed last

    t = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "table.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert t.returncode == 0 and "| contrastive | fp32 | 48 |" in t.stdout
