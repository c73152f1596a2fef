"""Smoke test of the benchmark's CPU path: kernels.py runs on tiny sizes and appends valid JSON lines;
table.py renders them. No timing is asserted (STYLE: speed is measured in bench/, never tested)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

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


def _quality():
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_summary_table_and_resume_key(tmp_path):
    """bench/quality.py: mean ± std over seeds (latest row per seed), the README table, and the key that makes a
    re-run skip what the JSONL already holds (the same for the row written and the plan checked)."""
    q = _quality()
    args = q.get_args_parser().parse_args(["--split", "val", "--", "cluster.k=50"])
    rows = []
    tau, fn_mode = q.effective_loss("spcl", args)
    epochs, precision, image_size = q.effective_budget("spcl", args)
    for seed, knn in [(0, 80.0), (1, 82.0), (2, 84.0), (2, 90.0)]:  # seed 2 re-run: the latest row counts
        rows.append(
            {
                "method": "spcl",
                "seed": seed,
                "split": "val",
                "knn_top1": knn,
                "linear_top1": knn - 1,
                "train_seconds": 60.0,
                "knn_curve": [[2, knn - 5], [4, knn]],
                "train_images": args.train_images,
                "overrides": q.method_overrides("spcl", args),
                "tau": tau,
                "fn_mode": fn_mode,
                "epochs": epochs,
                "precision": precision,
                "image_size": image_size,
            }
        )
    rows.append({**rows[0], "tau": 0.5, "knn_top1": 70.0})  # rows of earlier presets: their own lines
    rows.append({**rows[0], "fn_mode": "mask", "knn_top1": 71.0})
    rows.append({**rows[0], "tau": 0.5, "fn_mode": "mask", "knn_top1": 72.0})
    rows.append({**rows[0], "epochs": 6, "precision": "fp64", "knn_top1": 73.0})
    rows.append({**rows[0], "image_size": 28, "knn_top1": 74.0})
    longer = [*rows[0]["overrides"], "epochs=64"]  # the same method at another budget, untagged and tagged
    rows.append({**rows[0], "epochs": 64, "overrides": longer, "knn_top1": 75.0})
    rows.append({**rows[0], "method": "spcl-e64", "epochs": 64, "overrides": longer, "knn_top1": 76.0})
    simclr = {**rows[0], "method": "simclr", "overrides": q.method_overrides("simclr", args), "fn_mode": "none"}
    rows.append(simclr)
    rows.append(
        {
            "method": "raw",
            "seed": 0,
            "split": "val",
            "knn_top1": 81.0,
            "linear_top1": None,
            "train_seconds": 0.0,
            "overrides": q.method_overrides("raw", args),
        }
    )
    rows.append({"method": "raw", "seed": 0, "split": "test", "knn_top1": 1.0, "train_seconds": 0.0})
    summary = {s["method"]: s for s in q.summarise(rows, "val")}
    assert summary["spcl"]["knn"] == [80.0, 82.0, 90.0]
    assert abs(summary["spcl"]["knn_mean"] - 84.0) < 1e-9 and abs(summary["spcl"]["knn_std"] - 5.2915026) < 1e-6
    assert summary["raw"]["knn_mean"] == 81.0 and summary["raw"]["linear_mean"] is None
    text = q.table(list(summary.values()))
    assert "| spcl | 3 | 80.00 / 82.00 / 90.00 | 84.00 ± 5.29 | 83.00 ± 5.29 |" in text and "| raw | 1 |" in text
    assert "cluster.k=50" in q.method_overrides("simclr", args) and "data.subset=0" in q.method_overrides("raw", args)
    preset = yaml.safe_load(q.PRESET.read_text())
    preset_loss = preset["loss"]
    assert (
        q.effective_loss("spcl", args)
        == (q.PRESET_TAU, q.PRESET_FN_MODE)
        == (preset_loss["tau"], preset_loss["fn_mode"])
    )
    budget = (q.PRESET_EPOCHS, q.PRESET_PRECISION, q.PRESET_IMAGE_SIZE)
    from_yaml = (preset["epochs"], preset["precision"], preset["aug"]["image_size"])
    assert q.effective_budget("spcl", args) == (epochs, precision, image_size) == budget == from_yaml
    assert q.effective_budget("raw", args) == (None, None, None) != q.effective_budget("supervised", args)
    assert q.effective_loss("raw", args) == (None, None) == q.effective_loss("supervised", args)
    assert q.effective_loss("simclr", args) == (q.PRESET_TAU, "none")
    assert summary["spcl (τ 0.5)"]["knn"] == [70.0] and "| spcl (τ 0.5) | 1 |" in q.table(list(summary.values()))
    assert summary["spcl (mask)"]["knn"] == [71.0] and summary["spcl (τ 0.5, mask)"]["knn"] == [72.0]
    assert summary["spcl (6 ep, fp64)"]["knn"] == [73.0] and summary["spcl (28 px)"]["knn"] == [74.0]
    assert summary["spcl (64 ep)"]["knn"] == [75.0] and summary["spcl-e64"]["knn"] == [76.0]
    assert "simclr" in summary  # its fn_mode is its own (pinned by its overrides), not the preset's
    assert q._key(rows[0]) == q.planned_key("spcl", 0, args) != q._key(rows[4]) != q._key(rows[5])
    assert q._key(rows[7]) != q._key(rows[0]) != q._key(rows[8])  # another budget: run again, not skipped
    # ... in a folder of its own, not by resuming the earlier setting's checkpoint
    assert q.settings_digest("spcl", args) == q.settings_digest("spcl", q.get_args_parser().parse_args(
        ["--split", "test", "--", "cluster.k=50"]))  # fmt: skip
    assert q.settings_digest("spcl", args) != q.settings_digest("simclr", args)
    other = tmp_path / "preset.yaml"
    other.write_text(q.PRESET.read_text() + "epochs: 1\n")
    args_other = q.get_args_parser().parse_args(["--split", "val", "--config", str(other), "--", "cluster.k=50"])
    assert q.settings_digest("spcl", args_other) != q.settings_digest("spcl", args)
    assert q.plot(q.summarise(rows, "val"), "val", tmp_path).is_file()


def test_e2e_times_the_bank_estep_apart_from_the_first_pass(tmp_path):
    """bench/e2e.py with cluster.features=bank: the first E-step (a pass) is reported apart, the steady-state
    E-step share counts the bank's E-step and its per-step fill."""
    from tests.helpers import TINY_IN_PROCESS as TINY
    from tests.helpers import write_digit_images

    write_digit_images(tmp_path / "data" / "train", 20, corrupt=False)  # 200 images: 3 steps of 64 an epoch
    write_digit_images(tmp_path / "data" / "val", 2, corrupt=False, offset=20)
    out = tmp_path / "e2e.jsonl"
    cmd = [sys.executable, str(ROOT / "bench" / "e2e.py"), "--data", str(tmp_path / "data"), "--steps", "4",
           "--warmup", "1", "--results", str(out), *TINY, "batch_size=64", "cluster.k=4",
           "cluster.features=bank"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["config"]["features"] == "bank" and row["estep_first"]["source"] == "pass"
    assert row["estep_s"] is not None and row["bank_fill_ms"] > 0 and row["steps_per_epoch"] == 3
    fill_s = 3 * row["bank_fill_ms"] / 1e3
    assert abs(row["estep_share_epoch"] - (row["estep_s"] + fill_s) / row["epoch_s_est"]) < 1e-9
    assert "E-step features: bank" in r.stdout and "first E-step (pass)" in r.stdout


def test_quality_repulsion_shares_match_a_loop_over_pairs():
    """bench/quality.py --clusters: the share of an anchor's softmax denominator on its own group, against the
    definition written as a loop (float64; rows past one 1024-row chunk; a group of one image)."""
    q = _quality()
    g = torch.Generator().manual_seed(0)
    n, tau = 1100, 0.2
    z = torch.nn.functional.normalize(torch.randn(n, 8, dtype=torch.float64, generator=g), dim=1)
    a = torch.randint(0, 7, (n,), generator=g)
    a[0] = 99
    b = torch.randint(0, 3, (n,), generator=g)
    got = q.repulsion_shares(z, a, b, tau=tau)
    for k, lab in enumerate((a, b)):
        w = torch.exp(z @ z.T / tau)
        w.fill_diagonal_(0)
        want = ((w * (lab[:, None] == lab[None])).sum(1) / w.sum(1)).mean().item()
        assert abs(got[k] - want) < 1e-12, (k, got[k], want)
