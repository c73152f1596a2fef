"""End to end through the command line: `train.py` (a few steps of the digits preset, then `--resume auto`),
`python -m protoclr.eval`, and (slow) the learning test of the default `make train` run."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protoclr import config
from tests.helpers import TINY

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _last_json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cli_train_resume_auto_and_eval(tmp_path):
    out = tmp_path / "digits"
    first = _last_json(_run("train.py", "--out", str(out), "--max-steps", "3", "--device", "cpu", *TINY))
    assert first["step"] == 3 and 0 <= first["top1"] <= 100
    assert (out / "checkpoint.pth").is_file() and (out / "config.yaml").is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((out / "checkpoint.pth").stat().st_mode) == 0o666 & ~umask  # like any file the user writes
    stale = out / ".checkpoint0003.pth.0badc0de.tmp"  # a save killed mid-write; not a name this run writes again
    stale.write_bytes(b"half a checkpoint")
    proc = _run("train.py", "--out", str(out), "--max-steps", "5", "--resume", "auto", "--device", "cpu", *TINY)
    second = _last_json(proc)
    assert second["step"] == 5
    assert not stale.exists() and "removed 1 stale temporary file(s)" in proc.stdout  # when the run starts
    assert f"resume: {out / 'checkpoint.pth'} at epoch 0, step 3" in proc.stdout
    assert "epoch 0 step 4/5 | loss" in proc.stdout  # continues at step 4, not 1
    lines = (out / "metrics.csv").read_text().splitlines()
    assert [int(x.split(",")[0]) for x in lines[1:]] == [1, 2, 3, 4, 5]
    knn = _last_json(_run("-m", "protoclr.eval", "knn", "--ckpt", str(out / "checkpoint.pth"), "--device", "cpu"))
    assert knn["top1"] == pytest.approx(second["top1"], abs=1e-3)


def test_cli_bf16_compiled_backbone(tmp_path):
    """The GPU recipe's code paths on the CPU: bf16 autocast and a torch.compile'd backbone train, the loss stays
    finite and the checkpoint holds clean parameter names (no `_orig_mod.`)."""
    from protoclr import checkpoint

    out = tmp_path / "bf16"
    proc = _run(
        "train.py",
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--device",
        "cpu",
        *TINY,
        "precision=bf16",
        "model.compile=true",
    )
    assert _last_json(proc)["step"] == 2
    assert "bf16 precision" in proc.stdout
    assert all(row.split(",")[2] not in ("nan", "inf") for row in (out / "metrics.csv").read_text().splitlines()[1:])
    state = checkpoint.load(out / "checkpoint.pth")
    assert state["config"]["model"]["compile"] is True
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state["model"])


def _train_cli():
    spec = importlib.util.spec_from_file_location("protoclr_train_cli", REPO / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_help_and_errors(tmp_path, capsys):
    cli = _train_cli()
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in config.flatten(config.Config()):
        assert f"  {key}=" in text, key
    for flag in ("--config", "--data", "--out", "--epochs", "--batch-size", "--max-steps", "--resume", "--device"):
        assert flag in text
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path), "optim.base_rl=0.1"])
    assert e.value.code == 2
    assert "unknown key 'optim.base_rl'; did you mean 'optim.base_lr'" in capsys.readouterr().err
    # user errors found while the run starts (missing data, a setting that contradicts the data) are one line
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path), "--data", str(tmp_path / "missing"), *TINY])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not exist" in err and "Traceback" not in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        cli.main(["--out", str(tmp_path / "sup"), *TINY, "cluster.source=labels"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "set cluster.k=10" in err and len(err.splitlines()) == 1
    from protoclr.eval.__main__ import main as eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(["--help"])
    assert e.value.code == 0 and "--ckpt" in capsys.readouterr().out


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_torchrun_two_cpu_ranks_resume_exact(tmp_path, backend):
    """`torchrun --nproc_per_node=2` on the CPU (gloo, DistBatchNorm, sharded sampler and clustering): 2 steps, stop,
    --resume auto, 2 steps gives the same parameters as 4 steps straight; only rank 0 prints the JSON line. With DALI,
    each rank's pipeline state travels in the checkpoint."""
    import torch

    from protoclr import checkpoint

    def torchrun(out, *extra):
        return _run(
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "train.py",
            "--out",
            str(out),
            "--device",
            "cpu",
            *TINY,
            f"data.backend={backend}",
            *extra,
        )

    straight = torchrun(tmp_path / "a", "--max-steps", "4")
    assert _last_json(straight)["step"] == 4
    assert sum(line.startswith("{") for line in straight.stdout.splitlines()) == 1
    assert "2 process(es), device cpu" in straight.stdout
    assert _last_json(torchrun(tmp_path / "b", "--max-steps", "2"))["step"] == 2
    assert _last_json(torchrun(tmp_path / "b", "--max-steps", "4", "--resume", "auto"))["step"] == 4
    a = checkpoint.load(tmp_path / "a" / "checkpoint.pth")
    b = checkpoint.load(tmp_path / "b" / "checkpoint.pth")
    assert a["world_size"] == 2 and len(a["rng"]) == 2 and len(a["loader"]) == 2
    if backend == "dali":
        assert [s["position"] for s in b["loader"]] == [4, 4] and b["loader"][0]["dali"] != b["loader"][1]["dali"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
def test_learning_digits_preset(tmp_path):
    """`make train` (the default digits preset) learns: it ends by scoring raw pixels and the random-init encoder
    with the same kNN on the same held-out digits, and the trained encoder beats both."""
    t0 = time.time()
    trained = _last_json(_run("train.py", "--out", str(tmp_path / "digits"), "progress=false", timeout=1800))
    wall = time.time() - t0
    log = (tmp_path / "digits" / "train.log").read_text()
    assert "same kNN on raw pixels" in log and "on the random-init encoder" in log
    ckpt = str(tmp_path / "digits" / "checkpoint.pth")
    pixels = _last_json(_run("-m", "protoclr.eval", "knn", "--ckpt", ckpt, "--features", "pixels"))
    assert abs(pixels["top1"] - trained["knn_pixels"]) < 1e-6  # the trainer's baseline is the eval CLI's
    print(
        f"\ndigits preset, kNN top-1 (k=20, T=0.07) on 355 held-out digits: trained {trained['top1']:.2f}% "
        f"| same encoder at random init {trained['knn_random_init']:.2f}% | raw pixels {trained['knn_pixels']:.2f}% "
        f"| make-train wall time {wall:.0f}s"
    )
    assert trained["top1"] >= trained["knn_random_init"] + 2.0
    assert trained["top1"] > trained["knn_pixels"]
