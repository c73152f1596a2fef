"""User errors on the command lines (`train.py`, `python -m protoclr.eval`): one line on stderr, exit code 2, no
traceback; `--debug` shows it. Most cases run `main(argv)` in-process (a python start with torch costs seconds);
`test_no_traceback_in_a_real_process` checks the real processes."""

from __future__ import annotations

import pytest
import torch
from test_e2e import _run, _train_cli

from protoclr import checkpoint, cluster, config
from protoclr.eval.__main__ import main as eval_main
from protoclr.model import build_model
from tests.helpers import TINY_IN_PROCESS as TINY
from tests.helpers import write_digit_images


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small digits folder, folders and files a user might pass by mistake, and checkpoints good and bad."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    write_digit_images(root / "data", 5, corrupt=False)  # 10 classes x 5 images
    (root / "empty").mkdir()
    for c in ("a", "b"):
        (root / "no_images" / c).mkdir(parents=True)
    (root / "other" / "x").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "other" / "x" / "0.png")
    (root / "a_file").write_text("not a folder")
    cfg = config.resolve(config.DEFAULT_PRESET, {"data.root": str(root / "data")}, TINY)
    state = {"model": build_model(cfg).state_dict(), "config": config.to_dict(cfg), "epoch": 0, "step": 0}
    good = checkpoint.save(root / "ckpts" / "checkpoint.pth", state)
    (root / "truncated.pth").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"state_dict": {}}, root / "not_ours.pth")
    (root / "raw.zip").write_bytes(b"PK\x03\x04" + bytes(64))
    return root


def _one_line_exit_2(capsys, main, argv, expect: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expect in err, err
    return err


def test_train_user_errors_are_one_line(files, capsys, monkeypatch):
    cli = _train_cli()
    run = ["--out", str(files / "out"), "--device", "cpu", "--max-steps", "1", *TINY]
    data = ["--data", str(files / "data")]
    ckpt = str(files / "ckpts" / "checkpoint.pth")

    def fails_with(expect, *argv):
        return _one_line_exit_2(capsys, cli.main, [*run, *argv], expect)

    fails_with("does not exist", "--data", str(files / "missing"))
    fails_with("--config file", *data, "--config", str(files / "missing.yaml"))
    fails_with("no images", "--data", str(files / "empty"))
    fails_with("found 2 class folder(s)", "--data", str(files / "no_images"))
    fails_with("batch_size=64 exceeds the 45 training images", *data, "batch_size=64")
    fails_with("they must match", *data, f"data.val={files / 'other'}")
    fails_with("is a file", *data, "--out", str(files / "a_file"))
    fails_with("loss.tau must be a finite number, got nan", *data, "loss.tau=nan")
    fails_with("loss.tau must be in [0.001, 1000], got 1e-05", *data, "loss.tau=1e-5")
    fails_with("optim.base_lr must be a finite number", *data, "optim.base_lr=.nan")
    fails_with("no such checkpoint", *data, "--resume", str(files / "missing.pth"))
    fails_with("cannot be read: truncated", *data, "--resume", str(files / "truncated.pth"))
    fails_with("cannot be read", *data, "--resume", str(files / "raw.zip"))
    fails_with("not a protoclr checkpoint", *data, "--resume", str(files / "not_ours.pth"))
    fails_with("does not match the model", *data, "--resume", ckpt, "model.width=8")
    if not torch.cuda.is_available():
        fails_with("CUDA is not available", *data, "--device", "cuda")

    # cluster.k above the dataset size is refused before the (possibly long) feature extraction
    def no_extraction(*a, **k):
        raise AssertionError("features were extracted before cluster.k was checked")

    monkeypatch.setattr(cluster, "extract_features", no_extraction)
    fails_with("cluster.k=46 exceeds the 45 training images", *data, "cluster.k=46", "batch_size=8")


def test_eval_user_errors_are_one_line(files, capsys):
    ckpt = str(files / "ckpts" / "checkpoint.pth")

    def fails_with(expect, *argv):
        return _one_line_exit_2(capsys, eval_main, ["knn", "--device", "cpu", *argv], expect)

    fails_with("does not exist", "--ckpt", str(files / "missing.pth"))
    fails_with(
        f"is a folder, not a checkpoint file; pass its latest checkpoint file, {ckpt!r}", "--ckpt", str(files / "ckpts")
    )
    fails_with("cannot be read: truncated", "--ckpt", str(files / "truncated.pth"))
    fails_with("cannot be read", "--ckpt", str(files / "raw.zip"))
    fails_with("it lacks ['model', 'config', 'epoch', 'step']", "--ckpt", str(files / "not_ours.pth"))
    fails_with("eval.knn_k must be >= 1, got 0", "--ckpt", ckpt, "--k", "0")
    fails_with("eval.knn_t must be > 0, got -1.0", "--ckpt", ckpt, "--t", "-1")
    fails_with("eval.knn_t must be a finite number, got nan", "--ckpt", ckpt, "--t", "nan")
    fails_with("they must match", "--ckpt", ckpt, "--val", str(files / "other"))
    fails_with("does not match the model", "--ckpt", ckpt, "model.width=8")
    fails_with("does not exist", "--ckpt", ckpt, "--data", str(files / "missing"))
    fails_with("no images", "--ckpt", ckpt, "--data", str(files / "empty"))
    fails_with("--init trained needs --ckpt", "--data", str(files / "data"))
    fails_with("no held-out set", "--ckpt", ckpt, "--data", str(files / "data"), "data.holdout=0")
    if not torch.cuda.is_available():
        fails_with("CUDA is not available", "--ckpt", ckpt, "--device", "cuda")


def test_debug_flag_keeps_the_traceback(files):
    with pytest.raises(ValueError, match="cannot be read"):
        eval_main(["knn", "--device", "cpu", "--ckpt", str(files / "truncated.pth"), "--debug"])
    with pytest.raises(ValueError, match="finite"):
        _train_cli().main(["--out", str(files / "out"), "loss.tau=nan", "--debug"])


@pytest.mark.parametrize("text", ["nan", ".nan", "NaN", "inf", "-.inf"])
def test_non_finite_numbers_are_refused_at_parse_time(text):
    for key in ("loss.tau", "optim.base_lr", "optim.clip_grad", "data.holdout", "aug.crop_scale"):
        value = f"[{text},1.0]" if key == "aug.crop_scale" else text
        with pytest.raises(ValueError, match=f"{key} must be a finite number"):
            config.resolve(None, {}, [f"{key}={value}"])


@pytest.mark.parametrize("text", ["on", "off", "auto"])
def test_on_off_words_reach_text_fields(text, tmp_path):
    # YAML 1.1 reads `on`/`off` as booleans: `aug.blur=on` must still mean 'on', on the command line and in a preset.
    assert config.resolve(None, {}, [f"aug.blur={text}"]).aug.blur == text
    preset = tmp_path / "p.yaml"
    preset.write_text(f"aug:\n  blur: {text}\n")
    assert config.resolve(preset, {}, []).aug.blur == text
    assert config.parse_kv(["data.root=no", "x=yes", "y=Off"]) == {"data.root": "no", "x": "yes", "y": "Off"}
    assert config.resolve(None, {}, ["eval.baselines=false"]).eval.baselines is False
    assert config.resolve(None, {}, ["eval.baselines=True"]).eval.baselines is True


def test_no_traceback_in_a_real_process(files):
    """The real processes (no pytest capture): a user error ends with one line on stderr and exit code 2."""
    train = _run("train.py", "--out", str(files / "out"), "--data", str(files / "no_images"), *TINY)
    evaluate = _run("-m", "protoclr.eval", "knn", "--ckpt", str(files / "truncated.pth"), "--device", "cpu")
    for proc, prog in ((train, "train.py"), (evaluate, "python -m protoclr.eval")):
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"{prog}: error: "), proc.stderr
