"""`python -m protoclr.export`: the backbone loads into a fresh torchvision ResNet with strict=True (fc set to
Identity, the CIFAR stem swapped in where it was trained) and gives protoclr's encoder's features, in float64."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from test_e2e import _run
from torch import nn

from protoclr import checkpoint, config
from protoclr.export import main as export_main
from protoclr.model import build_model
from tests.helpers import TINY_IN_PROCESS as TINY
from tests.helpers import write_digit_images


def _fresh_torchvision(arch: str, stem: str) -> nn.Module:
    """What a user writes from the metadata (not protoclr's helper: the test must not check the code against itself)."""
    model = getattr(torchvision.models, arch)()
    model.fc = nn.Identity()
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


# metadata entries that are numbers or lists: JSON text in a safetensors header (whose values are all strings)
_JSON_KEYS = {"feat_dim", "image_size", "resize_size", "mean", "std", "tensors", "parameters", "epoch", "step"}


def _read(path, fmt: str) -> tuple[dict[str, torch.Tensor], dict]:
    if fmt == "safetensors":
        with safe_open(str(path), "pt") as f:
            header = f.metadata()
        return load_file(str(path)), {k: json.loads(v) if k in _JSON_KEYS else v for k, v in header.items()}
    return torch.load(path, weights_only=True), json.loads(path.with_name(path.name + ".json").read_text())


def _assert_same_features(ckpt, out, fmt: str, arch: str, stem: str, image_size: int) -> None:
    sd, meta = _read(out, fmt)
    with pytest.raises(RuntimeError, match="fc.weight"):  # fc is excluded: a stock model wants one
        getattr(torchvision.models, arch)().load_state_dict(sd, strict=True)
    tv = _fresh_torchvision(arch, stem)
    tv.load_state_dict(sd, strict=True)
    state = checkpoint.load(ckpt)
    ours = build_model(config.from_dict(state["config"]))
    checkpoint.load_model_state(ours, state["model"])
    x = torch.randn(2, 3, image_size, image_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours.backbone.double().eval()(x)
        got = tv.double().eval()(x)
    assert got.shape == want.shape == (2, meta["feat_dim"])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert meta["arch"] == arch and meta["stem"] == stem and meta["image_size"] == image_size
    cfg = config.from_dict(state["config"])
    assert meta["mean"] == list(cfg.aug.mean) and meta["std"] == list(cfg.aug.std)
    assert meta["load"].startswith(f"model = torchvision.models.{arch}(); model.fc = torch.nn.Identity()")


def test_export_of_a_trained_run(tmp_path, capsys):
    """train.py's own checkpoint (ResNet-18 of width 64, CIFAR stem at 8 px, one step) in both formats."""
    from protoclr.trainer import train

    write_digit_images(tmp_path / "data", 5, corrupt=False)
    over = TINY + ["model.width=64", "batch_size=8", "cluster.k=3", "eval.baselines=false"]
    named = {"out": str(tmp_path / "run"), "max_steps": 1, "data.root": str(tmp_path / "data")}
    ckpt = train(config.resolve(config.DEFAULT_PRESET, named, over))["checkpoint"]
    for fmt, name in (("torchvision", "backbone.pth"), ("safetensors", "backbone.safetensors")):
        res = export_main(["--ckpt", ckpt, "--out", str(tmp_path / name), "--format", fmt])
        printed = capsys.readouterr().out
        assert "fc is excluded" in printed and json.loads(printed.strip().splitlines()[-1]) == res
        assert res["step"] == 1 and res["tensors"] == len(_fresh_torchvision("resnet18", "cifar").state_dict())
    _assert_same_features(ckpt, tmp_path / "backbone.pth", "torchvision", "resnet18", "cifar", 8)
    pth, pth_meta = _read(tmp_path / "backbone.pth", "torchvision")
    st, st_meta = _read(tmp_path / "backbone.safetensors", "safetensors")
    assert pth.keys() == st.keys() and all(torch.equal(pth[k], st[k]) for k in pth)
    drop = ("format", "load")  # all else is the same metadata in both formats
    assert {k: v for k, v in pth_meta.items() if k not in drop} == {k: v for k, v in st_meta.items() if k not in drop}


def test_export_imagenet_stem_resnet50(tmp_path, capsys):
    """The ImageNet stem loads into the stock torchvision model (only fc swapped), Bottleneck names included; BN
    statistics made non-trivial, weights stored channels_last as the trainer keeps them."""
    arch, fmt = "resnet50", "safetensors"
    # Trained on 32-px crops, scored at 40: the metadata gives the evaluation's input (aug.eval_size).
    over = [f"model.arch={arch}", "model.stem=imagenet", "aug.image_size=32", "aug.eval_size=40", "cluster.k=5"]
    cfg = config.resolve(None, {}, over)
    model = build_model(cfg).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    state = {"model": model.state_dict(), "config": config.to_dict(cfg), "epoch": 2, "step": 9}
    ckpt = checkpoint.save(tmp_path / "checkpoint.pth", state)
    out = tmp_path / f"{arch}.safetensors"
    export_main(["--ckpt", str(ckpt), "--out", str(out), "--format", fmt])
    capsys.readouterr()
    _assert_same_features(ckpt, out, fmt, arch, "imagenet", 40)
    assert _read(out, fmt)[1]["resize_size"] == 46  # round(40 / 0.875)


def test_export_user_errors(tmp_path, capsys):
    cfg = config.resolve(None, {}, ["model.width=4", "cluster.k=5"])
    ckpt = checkpoint.save(
        tmp_path / "checkpoint.pth",
        {"model": build_model(cfg).state_dict(), "config": config.to_dict(cfg), "epoch": 0, "step": 0},
    )
    for argv, expect in (
        (["--ckpt", str(ckpt), "--out", str(tmp_path / "b.pth")], "model.width=4, but torchvision.models.resnet18"),
        (["--ckpt", str(ckpt), "--out", str(tmp_path)], "is a folder; pass a file name"),
        (["--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "b.pth")], "does not exist"),
    ):
        with pytest.raises(SystemExit) as e:
            export_main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "b.pth").exists()
    proc = _run("-m", "protoclr.export", "--ckpt", str(ckpt), "--out", str(tmp_path / "b.safetensors"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith(
        "python -m protoclr.export: error: export: the checkpoint's backbone has model.width=4"
    )
