"""protoclr.eval: weighted kNN, linear probe, data splits, and `python -m protoclr.eval knn|linear`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from protoclr import config
from protoclr.data import load_splits
from protoclr.eval import knn_classify, linear_probe
from protoclr.eval.__main__ import main as eval_main


def _blobs(n_per: int, classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per)
    return mu[y] + spread * torch.randn(y.numel(), dim, generator=g), y


def test_knn_separable_and_by_hand():
    x, y = _blobs(30, 6, 8, 0.05, 0)
    xt, yt = _blobs(10, 6, 8, 0.05, 0)  # same centres (same seed), other noise draws not needed
    res = knn_classify(x, y, xt + 0.01, yt, k=20, t=0.07)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["k"] == 20
    # by hand: 3 bank points, k=2; query closest to two class-1 points with lower similarity than one class-0 point
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[0.95, 0.3122]])
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(bank, dim=1).T
    top = sims[0].topk(2)
    votes = torch.zeros(2).scatter_add_(0, labels[top.indices], (top.values / 0.07).exp())
    res = knn_classify(bank, labels, q, torch.tensor([int(votes.argmax())]), k=2, t=0.07)
    assert res["top1"] == 100.0
    assert knn_classify(bank, labels, q, torch.tensor([0]), k=50, t=0.07)["k"] == 3  # k capped at the bank size
    with pytest.raises(ValueError, match="same D|one D"):
        knn_classify(bank, labels, torch.zeros(1, 3), torch.tensor([0]))


def test_linear_probe_learns_separable_features():
    x, y = _blobs(40, 5, 16, 0.3, 1)
    xt, yt = _blobs(10, 5, 16, 0.3, 1)
    res = linear_probe(x, y, xt, yt, epochs=20, lr=0.1, batch_size=32)
    assert res["top1"] >= 95.0 and res["train_top1"] >= 95.0
    assert res["lr"] == pytest.approx(0.1 * 32 / 256)
    chance = linear_probe(
        torch.randn(200, 16), torch.randint(0, 5, (200,)), torch.randn(50, 16), torch.randint(0, 5, (50,)), epochs=5
    )
    assert chance["top1"] < 60.0


def _folder(root, classes=("a", "b", "c"), n=4):
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / c / f"{i}.png")


def test_load_splits(tmp_path):
    _folder(tmp_path / "both" / "train")
    _folder(tmp_path / "both" / "val", n=2)
    _folder(tmp_path / "both" / "test", n=1)
    train, val, _ = load_splits(config.DataConfig(root=str(tmp_path / "both")))
    assert len(train) == 12 and len(val) == 6  # val/ preferred over test/
    _folder(tmp_path / "flat", n=10)
    train, val, desc = load_splits(config.DataConfig(root=str(tmp_path / "flat"), holdout=0.2), seed=3)
    assert len(train) == 24 and len(val) == 6 and "held out" in desc
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}  # never trained on
    again = load_splits(config.DataConfig(root=str(tmp_path / "flat"), holdout=0.2), seed=3)[1]
    assert again.samples == val.samples
    assert load_splits(config.DataConfig(root=str(tmp_path / "flat"), holdout=0.0))[1] is None
    _folder(tmp_path / "other", classes=("x", "y", "z"))
    with pytest.raises(ValueError, match="must match"):
        load_splits(config.DataConfig(root=str(tmp_path / "flat"), val=str(tmp_path / "other")))


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory):
    """A checkpoint of a few steps on a small digits folder (train/ 20 per class, val/ 5 per class)."""
    from protoclr.trainer import train
    from tests.helpers import TINY_IN_PROCESS as TINY
    from tests.helpers import write_digit_images

    root = tmp_path_factory.mktemp("eval_run")
    write_digit_images(root / "data" / "train", 20, corrupt=False)
    write_digit_images(root / "data" / "val", 5, corrupt=False, offset=20)
    cfg = config.resolve(
        config.DEFAULT_PRESET, {"out": str(root / "out"), "max_steps": 3, "data.root": str(root / "data")}, TINY
    )
    res = train(cfg)
    return root / "out" / "checkpoint.pth", res


def _last_json(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


def test_eval_cli_knn_linear_and_baselines(trained_ckpt, capsys):
    ckpt, train_res = trained_ckpt
    res = eval_main(["knn", "--ckpt", str(ckpt)])
    assert _last_json(capsys) == res
    assert res["mode"] == "knn" and 0 <= res["top1"] <= 100 and res["n_test"] == 50 and res["k"] == 20
    assert res["top1"] == pytest.approx(train_res["top1"], abs=1e-3)  # the trainer's final monitor, same numbers
    lin = eval_main(["linear", "--ckpt", str(ckpt), "--epochs", "3", "eval.linear_batch_size=64"])
    assert _last_json(capsys)["top1"] == lin["top1"] and lin["epochs"] == 3
    data = str(ckpt.parent.parent / "data")
    rnd = eval_main(["knn", "--init", "random", "--data", data, "model.width=4", "aug.image_size=8"])
    px = eval_main(["knn", "--features", "pixels", "--data", data, "aug.image_size=8", "--k", "5"])
    assert rnd["init"] == "random" and px["features"] == "pixels" and px["k"] == 5
    assert all(math.isfinite(r["top1"]) for r in (rnd, px))
    with pytest.raises(SystemExit) as e:  # a user error (exit 2, one line), not argparse or a crash
        eval_main(["knn", "--init", "trained", "--data", data])  # no checkpoint to evaluate
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--init trained needs --ckpt" in err and len(err.splitlines()) == 1


def test_eval_drops_unreadable_images(trained_ckpt, tmp_path, capsys):
    """An unreadable image is left out of the bank and the queries (the loader gives it as a blank image, which used
    to vote and be scored): the result is that of the folder without it, and the output counts it."""
    import shutil

    ckpt, _ = trained_ckpt
    clean = ckpt.parent.parent / "data"
    shutil.copytree(clean, tmp_path / "data")
    (tmp_path / "data" / "train" / "3" / "zz_garbage.png").write_bytes(b"this is not an image at all")
    (tmp_path / "data" / "val" / "5" / "zz_empty.png").write_bytes(b"")
    (tmp_path / "data" / "val" / "7" / "zz_garbage.png").write_bytes(b"GIF89a, or not")
    for mode, extra in (("knn", []), ("linear", ["--epochs", "2"]), ("knn", ["data.backend=dali"])):
        want = eval_main([mode, "--ckpt", str(ckpt), "--data", str(clean), *extra])
        got = eval_main([mode, "--ckpt", str(ckpt), "--data", str(tmp_path / "data"), *extra])
        assert got.get("n_train") == want.get("n_train") and got.get("n_test") == want.get("n_test")
        assert got["top1"] == want["top1"]
        assert (got["unreadable_train"], got["unreadable_val"]) == (1, 2)
        assert (want["unreadable_train"], want["unreadable_val"]) == (0, 0)
    assert f"dropped 2 unreadable image(s) of {tmp_path / 'data' / 'val'}" in capsys.readouterr().out
