"""The trainer's parts (config, model, LARS, schedule, checkpoints, monitor) and whole runs of `trainer.train` on a
tiny configuration of the digits preset: exact mid-epoch resume, bad images, NaN detection."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from protoclr import checkpoint, config, ops
from protoclr.model import DistBatchNorm, build_backbone, build_model, convert_sync_batchnorm
from protoclr.optim import LARS, WarmupCosine, build_optimizer, param_groups, scaled_lr
from tests.helpers import tiny_cfg, write_digit_images

# ------------------------------------------------------------------------------------------------ config


def test_config_precedence(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("epochs: 7\nbatch_size: 64\noptim:\n  base_lr: 0.3\n  warmup_epochs: 1\nmodel.width: 8\n")
    cfg = config.resolve(preset, {"batch_size": 32, "epochs": None}, ["optim.base_lr=1e-3", "aug.crop_scale=[0.2,1]"])
    assert cfg.epochs == 7  # preset over default
    assert cfg.batch_size == 32  # named flag over preset
    assert cfg.optim.base_lr == 0.001  # key=value over preset (PyYAML reads 1e-3 as text: coerced)
    assert cfg.optim.warmup_epochs == 1.0 and isinstance(cfg.optim.warmup_epochs, float)
    assert cfg.model.width == 8  # dotted keys in YAML work too
    assert cfg.aug.crop_scale == (0.2, 1.0)
    assert cfg.optim.momentum == 0.9  # untouched default
    back = config.from_dict(config.to_dict(cfg))
    assert back == cfg  # round trip through the checkpoint's dict


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'optim.base_lr'"):
        config.resolve(None, {}, ["optim.base_rl=1"])
    with pytest.raises(ValueError, match="epochs must be int"):
        config.resolve(None, {}, ["epochs=1.5"])
    with pytest.raises(ValueError, match="model.sync_bn must be bool"):
        config.resolve(None, {}, ["model.sync_bn=3"])
    with pytest.raises(ValueError, match="aug.crop_scale must be"):
        config.resolve(None, {}, ["aug.crop_scale=[0.5]"])
    with pytest.raises(ValueError, match="loss.fn_mode must be one of"):
        config.resolve(None, {}, ["loss.fn_mode=drop"])
    with pytest.raises(ValueError, match=r"cluster.features must be one of \['pass', 'bank'\]"):
        config.resolve(None, {}, ["cluster.features=memory"])
    with pytest.raises(ValueError, match="key=value"):
        config.resolve(None, {}, ["epochs"])
    with pytest.raises(ValueError, match="batch_size must be even"):
        config.resolve(None, {"batch_size": 33}, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.resolve(tmp_path / "missing.yaml", {}, [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lars_eta: 0.1\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*unknown key 'optim.lars_eta'.*'optim.eta'"):
        config.resolve(bad, {}, [])


def test_help_lists_every_key():
    text = config.help_text()
    for key in config.flatten(config.Config()):
        assert f"  {key}=" in text, key
    for _, f, _, _ in config._fields(config.Config()):
        assert f.metadata.get("help"), f"{f.name} has no help"


@pytest.mark.parametrize("name", ["digits", "fmnist", "cifar_r18", "imagenet_r50"])
def test_presets_load(name):
    cfg = config.resolve(Path(config.DEFAULT_PRESET).parent / f"{name}.yaml", {}, [])
    if name == "imagenet_r50":
        assert (cfg.model.arch, cfg.batch_size, cfg.cluster.k, cfg.data.backend) == ("resnet50", 4096, 3000, "dali")
        assert cfg.precision in ("auto", "bf16")
    if name == "cifar_r18":
        assert (cfg.model.arch, cfg.model.stem, cfg.cluster.k, cfg.loss.tau) == ("resnet18", "cifar", 512, 0.5)


def test_cpu_autocast_warns_without_native_support(monkeypatch, caplog):
    """bf16 autocast on a CPU without native bf16 is slower than fp32: the log says so and how to turn it off."""
    from protoclr import trainer

    cfg = config.Config(precision="bf16")
    monkeypatch.setattr(trainer, "_cpu_has_native", lambda dtype: True)
    with caplog.at_level("WARNING", logger="protoclr.trainer"):
        assert trainer._setup_precision(cfg, torch.device("cpu"))[:2] == ("bf16", torch.bfloat16)
    assert not caplog.records
    monkeypatch.setattr(trainer, "_cpu_has_native", lambda dtype: False)
    with caplog.at_level("WARNING", logger="protoclr.trainer"):
        trainer._setup_precision(cfg, torch.device("cpu"))
    assert "set precision=fp32" in caplog.text
    assert trainer.resolve_precision("auto", "cpu") == "fp32" and trainer.resolve_precision("auto", "cuda") == "bf16"


# ------------------------------------------------------------------------------------------------ model


def test_backbone_matches_torchvision_names_and_shapes():
    ours = build_backbone("resnet18").state_dict()
    ref = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    assert ours.keys() == ref.keys()
    assert all(ours[k].shape == ref[k].shape for k in ref)
    r50 = build_backbone("resnet50")
    assert r50.feat_dim == 2048
    small = build_backbone("resnet18", width=8, cifar_stem=True)
    x = torch.randn(2, 3, 16, 16)
    assert small(x).shape == (2, 64)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)


def test_model_forward_multicrop_and_classifier_reset():
    cfg = config.resolve(None, {}, ["model.width=4", "cluster.k=7", "model.proj_dim=16", "aug.image_size=16"])
    m = build_model(cfg)
    views = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    h, z, logits = m(views)
    assert h.shape == (9, 32) and z.shape == (9, 16) and logits.shape == (9, 7)
    assert torch.allclose(z.norm(dim=1), torch.ones(9), atol=1e-5)
    m.reset_classifier("random", seed=5)
    w1 = m.classifier.weight.clone()
    state = torch.get_rng_state()
    m.reset_classifier("random", seed=5)
    assert torch.equal(w1, m.classifier.weight)  # seeded: the same on every rank and on resume
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    m.reset_classifier("random", seed=6)
    assert not torch.equal(w1, m.classifier.weight)
    m.reset_classifier("zero")
    _, _, logits = m(views)
    assert not logits.any()  # CE starts at ln K
    with pytest.raises(ValueError, match="init"):
        m.reset_classifier("xavier")


def test_dist_batchnorm_single_process_is_batchnorm():
    bn = nn.Sequential(nn.BatchNorm2d(4), nn.BatchNorm1d(3))
    conv = convert_sync_batchnorm(bn, torch.device("cpu"))
    assert all(isinstance(m, DistBatchNorm) for m in conv)
    assert conv[0].weight is bn[0].weight and conv[0].running_mean is bn[0].running_mean
    x = torch.randn(5, 4, 3, 3)
    ref = nn.BatchNorm2d(4)
    assert torch.allclose(conv[0](x), ref(x))
    assert torch.allclose(conv[0].running_var, ref.running_var)


# ------------------------------------------------------------------------------------------------ optim


def test_param_groups_exempt_bn_and_bias():
    m = build_model(config.resolve(None, {}, ["model.width=4"]))
    groups = param_groups(m, 1e-6)
    ids = {id(p): g for g in groups for p in g["params"]}
    assert ids[id(m.backbone.bn1.weight)]["lars_exclude"] and ids[id(m.backbone.bn1.weight)]["weight_decay"] == 0
    assert ids[id(m.head.bias)]["lars_exclude"] and ids[id(m.classifier.bias)]["weight_decay"] == 0
    assert not ids[id(m.backbone.conv1.weight)]["lars_exclude"]
    assert ids[id(m.head.weight)]["weight_decay"] == 1e-6
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_lars_step_matches_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = LARS(
        [
            {"params": [w], "weight_decay": 0.1, "lars_exclude": False},
            {"params": [b], "weight_decay": 0.0, "lars_exclude": True},
        ],
        lr=0.5,
        momentum=0.9,
        eta=0.01,
    )
    w0, b0 = w.detach().clone(), b.detach().clone()
    gw, gb = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for _ in range(2):
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    # by hand: d = g + wd p; q = eta |p| / |d|; buf = m buf + q d; p -= lr buf
    pw, bw = w0.clone(), torch.zeros_like(w0)
    pb, bb = b0.clone(), torch.zeros_like(b0)
    for _ in range(2):
        d = gw + 0.1 * pw
        bw = 0.9 * bw + 0.01 * pw.norm() / d.norm() * d
        pw = pw - 0.5 * bw
        bb = 0.9 * bb + gb
        pb = pb - 0.5 * bb
    assert torch.allclose(w, pw, atol=1e-12) and torch.allclose(b, pb, atol=1e-12)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)
    s = WarmupCosine(opt, base_lr=2.0, final_lr=0.1, total_steps=100, warmup_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # first step: base / warmup
    lrs = [s.lr_at(i) for i in range(120)]
    assert lrs[9] == pytest.approx(2.0) and lrs[10] == pytest.approx(2.0)
    assert all(a <= b + 1e-12 for a, b in zip(lrs[:10], lrs[1:10]))  # increasing warm-up
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # decreasing after
    assert lrs[55] == pytest.approx(0.1 + 0.5 * 1.9 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    for _ in range(37):
        s.step()
    s2 = WarmupCosine(opt, 2.0, 0.1, 100, 10)
    s2.load_state_dict(s.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[37])
    assert scaled_lr(1.0, 4096) == 16.0
    assert isinstance(build_optimizer(config.OptimConfig(name="sgd"), nn.Linear(2, 2), 0.1), torch.optim.SGD)


# ------------------------------------------------------------------------------------------------ checkpoint


def test_checkpoint_atomic_save_and_unwrap(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save(path, {"step": 1, "x": torch.ones(2)})
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save({"partial": True}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.load(path, keys=["step"])["step"] == 1  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temp file left
    m = nn.Sequential(nn.Linear(2, 2))
    compiled = torch.compile(m)
    assert checkpoint.unwrap(compiled) is m
    sd = checkpoint.clean_state_dict({"module._orig_mod.0.weight": torch.ones(1)})
    assert list(sd) == ["0.weight"]
    with pytest.raises(ValueError, match="missing"):
        checkpoint.load_model_state(nn.Linear(2, 2), {"weight": torch.ones(2, 2)})
    assert checkpoint.resolve_resume("auto", tmp_path / "empty") is None
    assert checkpoint.resolve_resume("auto", tmp_path) == path
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "nope.pth"), tmp_path)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    s = checkpoint.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(s)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# ------------------------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """train/ (20 real digits per class, 16 px) and val/ (5 per class): whole runs in seconds."""
    root = tmp_path_factory.mktemp("small_digits")
    write_digit_images(root / "train", 20, corrupt=False)
    write_digit_images(root / "val", 5, corrupt=False, offset=20)
    return root


def small_cfg(out: Path, data: Path, *extra: str, **named) -> config.Config:
    return tiny_cfg(out, *extra, **{"data.root": str(data)}, **named)


def _final_state(out: Path) -> dict:
    return checkpoint.load(out / "checkpoint.pth")


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_mid_epoch_is_exact(tmp_path, small_digits, backend):
    from protoclr.trainer import train

    be = f"data.backend={backend}"
    straight = train(small_cfg(tmp_path / "a", small_digits, be, max_steps=4))
    assert straight["step"] == 4
    first = train(small_cfg(tmp_path / "b", small_digits, be, max_steps=2))
    assert first["step"] == 2
    assert _final_state(tmp_path / "b")["step_in_epoch"] == 2
    second = train(small_cfg(tmp_path / "b", small_digits, be, max_steps=4, resume="auto"))
    assert second["step"] == 4
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert a["model"].keys() == b["model"].keys()
    diff = {k: float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"]}
    print("max |2+2 - 4| per tensor:", max(diff.values()))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), diff
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["sampler"] == b["sampler"] and a["scheduler"] == b["scheduler"]
    assert torch.equal(a["prototypes"]["ids"], b["prototypes"]["ids"])
    assert straight["top1"] == second["top1"]
    # the resumed run's metrics read as one run: steps 1..4 once each
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_resume_across_epoch_boundary_is_exact(tmp_path, small_digits, backend, caplog):
    """Resume from an end-of-epoch checkpoint: the next epoch re-clusters exactly as the straight run did (and a
    DALI loader, stopped at the end of an epoch, saves no mid-epoch state to restore)."""
    from protoclr.trainer import train

    extra = ["batch_size=64", "cluster.k=4", f"data.backend={backend}"]  # 3 steps per epoch on 200 images
    train(small_cfg(tmp_path / "a", small_digits, *extra, max_steps=5))
    train(small_cfg(tmp_path / "b", small_digits, *extra, max_steps=3))
    assert _final_state(tmp_path / "b")["epoch"] == 1 and _final_state(tmp_path / "b")["step_in_epoch"] == 0
    assert _final_state(tmp_path / "b")["loader"] == [{}]
    train(small_cfg(tmp_path / "b", small_digits, *extra, max_steps=5, resume="auto"))
    assert "reseeded" not in caplog.text
    a, b = _final_state(tmp_path / "a"), _final_state(tmp_path / "b")
    assert a["step"] == b["step"] == 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["prototypes"]["ids"], b["prototypes"]["ids"]) and a["prototypes"]["epoch"] == 1


def test_feature_bank_resume_is_exact(tmp_path, small_digits):
    """cluster.features=bank: E-steps after the first cluster the bank, with no second pass; a run stopped mid-epoch
    (its checkpoint holds the bank's rows so far) or at an epoch's end (the E-step ran before the checkpoint, which
    holds no bank) resumes bitwise as the straight run; the 8 images drop_last leaves get no prototype."""
    from protoclr.trainer import train

    extra = ["batch_size=64", "cluster.k=4", "cluster.features=bank", "epochs=4"]  # 3 steps per epoch on 200 images
    train(small_cfg(tmp_path / "a", small_digits, *extra, max_steps=8))
    log = (tmp_path / "a" / "train.log").read_text()
    assert log.count("| features ") == 1 and log.count("| bank ") == 2  # a pass for epoch 0 only
    train(small_cfg(tmp_path / "b", small_digits, *extra, max_steps=4))
    mid = _final_state(tmp_path / "b")
    assert (mid["epoch"], mid["step_in_epoch"], mid["bank"]["epoch"]) == (1, 1, 1)
    assert mid["bank"]["index"].numel() == 64 and mid["bank"]["feats"].shape == (64, 32)  # one batch of C=32
    train(small_cfg(tmp_path / "b", small_digits, *extra, max_steps=8, resume="auto"))
    train(small_cfg(tmp_path / "c", small_digits, *extra, max_steps=6))
    boundary = _final_state(tmp_path / "c")
    assert (boundary["epoch"], boundary["step_in_epoch"], boundary["bank"]) == (2, 0, None)
    assert boundary["prototypes"]["epoch"] == 2  # computed from epoch 1's bank before the checkpoint
    train(small_cfg(tmp_path / "c", small_digits, *extra, max_steps=8, resume="auto"))
    assert (tmp_path / "c" / "train.log").read_text().count("| features ") == 1  # no pass on resume
    a = _final_state(tmp_path / "a")
    assert a["prototypes"]["epoch"] == 2 and int((a["prototypes"]["ids"] == -1).sum()) == 200 % 64
    for other in (_final_state(tmp_path / "b"), _final_state(tmp_path / "c")):
        assert all(torch.equal(a["model"][k], other["model"][k]) for k in a["model"])
        assert torch.equal(a["prototypes"]["ids"], other["prototypes"]["ids"])
        assert torch.equal(a["prototypes"]["centroids"], other["prototypes"]["centroids"])


def test_step_loss_fills_the_bank_with_the_view_mean(small_digits):
    from protoclr.cluster import FeatureBank
    from protoclr.trainer import step_loss

    cfg = small_cfg(Path("unused"), small_digits)
    torch.manual_seed(0)
    model = build_model(cfg).double()
    views = [torch.randn(6, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    index = torch.tensor([9, 2, 14, 0, 7, 3])
    bank = FeatureBank(20, model.feat_dim, torch.float64)
    bank.reset(0)
    step_loss(model, model.head, views, index, torch.full((20,), -1), cfg, distributed=False, bank=bank)
    h, _, _ = model(views)  # train-mode BatchNorm: the same batch gives the same h
    want = (h[:6] + h[6:]) / 2
    torch.testing.assert_close(bank.feats[index], want.detach(), rtol=0, atol=1e-12)
    assert bank.counts.sum() == 6 and not bank.feats[[1, 4, 19]].any()


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_corrupt_images_do_not_stop_training(tmp_path, backend):
    from protoclr.trainer import train

    write_digit_images(tmp_path / "data" / "train", 7, corrupt=True)  # 70 good + 3 bad files
    write_digit_images(tmp_path / "data" / "val", 3, corrupt=False)
    out = tmp_path / "out"
    res = train(
        tiny_cfg(
            out,
            f"data.backend={backend}",
            "batch_size=8",
            "cluster.k=4",
            "epochs=2",
            **{"data.root": str(tmp_path / "data")},
        )
    )
    assert res["step"] == 2 * (73 // 8) and res["top1"] is not None
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["type"] == "epoch"]
    assert sum(e["skipped"] for e in epochs) >= 1  # the bad files were met, counted and skipped
    assert "skipped" in (out / "train.log").read_text()


def test_corrupt_images_get_no_prototype_from_the_bank(tmp_path):
    """A skipped file never reaches the bank (its batch slot holds a substitute with the substitute's index, met
    twice and averaged): with cluster.features=bank it gets id -1, as do the images drop_last left out."""
    from protoclr.data import scan_image_folder
    from protoclr.trainer import train

    write_digit_images(tmp_path / "data" / "train", 7, corrupt=True)
    write_digit_images(tmp_path / "data" / "val", 3, corrupt=False)
    named = {"data.root": str(tmp_path / "data")}
    train(tiny_cfg(tmp_path / "out", "batch_size=8", "cluster.k=4", "epochs=2", "cluster.features=bank", **named))
    ids = checkpoint.load(tmp_path / "out" / "checkpoint.pth")["prototypes"]["ids"]
    samples = scan_image_folder(tmp_path / "data" / "train").samples
    bad = [i for i, (path, _) in enumerate(samples) if Path(path).name.startswith("zz_")]
    assert len(bad) == 3 and (ids[bad] == -1).all()
    assert int((ids == -1).sum()) <= 3 + 73 % 8 and int((ids >= 0).sum()) >= 70 - 73 % 8


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch, small_digits):
    from protoclr import trainer

    real = ops.spcl_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(ops, "spcl_loss", poisoned)
    out = tmp_path / "out"
    with pytest.raises(
        trainer.NonFiniteLossError,
        match=r"non-finite loss at epoch 0 step 3/.*global step 3.*"
        r"con=.*sia=.*proto=.*last good checkpoint: .*checkpoint.pth \(step 2\)",
    ):
        trainer.train(small_cfg(out, small_digits, "ckpt_every=1", max_steps=6))
    state = checkpoint.load(out / "checkpoint.pth")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert "non-finite loss" in (out / "train.log").read_text()


def test_outputs_written(tmp_path, small_digits):
    from protoclr.trainer import train

    out = tmp_path / "out"
    from protoclr import ops

    threads = torch.get_num_threads()
    extra = ("tensorboard=true", "keep_every=1", "batch_size=40", "loss.backend=reference")
    res = train(small_cfg(out, small_digits, *extra, max_steps=5))
    assert torch.get_num_threads() == threads  # the run's CPU thread setting is undone
    assert ops.get_default_backend() == "auto"  # and its loss.backend (a later k-means would take another path)
    assert res["epochs_done"] == 1
    for name in ("config.yaml", "train.log", "metrics.csv", "metrics.jsonl", "checkpoint.pth", "checkpoint0001.pth"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    saved = config.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert saved.model.width == 4 and saved.out == str(out)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {"loss", "lr", "fn_rate", "img_per_s", "data_share"} <= rows[0].keys()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["type"] for x in lines].count("epoch") == 1 and lines[-1]["type"] == "final"
    log = (out / "train.log").read_text()
    assert "git " in log and "config:" in log and "epoch 0 step 1/5 | loss" in log and "| fn-rate" in log
    state = checkpoint.load(out / "checkpoint.pth")
    assert set(state) >= {
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "prototypes",
        "sampler",
        "rng",
        "epoch",
        "step",
        "config",
    }
    assert state["prototypes"]["ids"].min() >= 0 and state["prototypes"]["centroids"].shape[0] == 5
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert os.environ.get("RANK") is None


def test_paper_pairs_layout():
    from protoclr.data import paper_pairs

    b = 6  # 3 image pairs (0,1) (2,3) (4,5); row v*b + image
    i, j = paper_pairs(b, 2)
    got = {(int(x), int(y)) for x, y in zip(i, j)}
    want = set()
    for a in range(0, b, 2):
        a1, a2, b1, b2 = a, a + b, a + 1, a + 1 + b
        want |= {(a1, a2), (b1, b2), (a1, b1), (a1, b2), (a2, b1), (a2, b2)}
    assert len(i) == 3 * b and got == want
    with pytest.raises(ValueError, match="views"):
        paper_pairs(4, 1)
    with pytest.raises(ValueError, match="batch_size"):
        paper_pairs(5, 2)


def test_step_loss_paper_pairs_match_explicit_siamese(small_digits):
    """loss.pairs=paper scores exactly the sampler's same- and cross-image view pairs (SPEC 1.2 pairs=)."""
    from protoclr.data import paper_pairs
    from protoclr.trainer import step_loss

    cfg = small_cfg(Path("unused"), small_digits, "loss.pairs=paper", "loss.lambda_con=0", "loss.lambda_proto=0")
    torch.manual_seed(0)
    model = build_model(cfg).double()
    b = 8
    views = [torch.randn(b, 3, 8, 8, dtype=torch.float64) for _ in range(2)]
    index = torch.arange(b)
    table = torch.tensor([0, 0, 1, 2, 1, 1, 2, 0] + [0] * 100)
    loss, _, st = step_loss(model, model.head, views, index, table, cfg, distributed=False)
    h, _, _ = model(views)
    i, j = paper_pairs(b, 2)
    inst, proto = index.repeat(2), table[index].repeat(2)
    want = ops.siamese_loss(
        h, inst, proto, model.head.weight, model.head.bias, pairs=(i, j), balance=True, backend="reference"
    )
    assert torch.allclose(loss.double(), want.double(), rtol=1e-6), (loss, want)
    dense = ops.siamese_loss(h, inst, proto, model.head.weight, model.head.bias, backend="reference")
    assert not torch.allclose(loss.double(), dense.double(), rtol=1e-3)  # the option changes what is scored


def test_label_prototypes_supervised_baseline(tmp_path, small_digits):
    from protoclr.trainer import train

    with pytest.raises(ValueError, match="cluster.k=10"):
        train(small_cfg(tmp_path / "bad", small_digits, "cluster.source=labels", max_steps=1))
    out = tmp_path / "sup"
    extra = ["cluster.source=labels", "cluster.k=10", "loss.lambda_con=0", "loss.lambda_sia=0", "epochs=2"]
    res = train(small_cfg(out, small_digits, *extra))
    state = checkpoint.load(out / "checkpoint.pth")
    from protoclr.data import scan_image_folder

    labels = torch.tensor(scan_image_folder(small_digits / "train").targets)
    assert torch.equal(state["prototypes"]["ids"], labels) and state["prototypes"]["epoch"] == 0  # set once
    assert res["top1"] is not None and math.isfinite(res["top1"])
    # eval.baselines (on by default): the same kNN on raw pixels and on the random-init encoder, logged and returned
    assert 0 < res["knn_pixels"] <= 100 and 0 < res["knn_random_init"] <= 100
    assert "same kNN on raw pixels" in (out / "train.log").read_text()


# ------------------------------------------------------------------------------------------------ learning


def _heldout_nt_xent(model: nn.Module, views: list[torch.Tensor], index: torch.Tensor, tau: float) -> float:
    """NT-Xent (SPEC 1.1, fn_mode none) of the encoder's z on the views, in float64, BatchNorm in eval mode."""
    model.eval()
    with torch.no_grad():
        _, z, _ = model(views)
    inst = index.repeat(len(views))
    return ops.contrastive_loss(z.double(), inst, torch.full_like(inst, -1), tau=tau, backend="reference").item()


def test_short_run_learns_to_tell_views_apart(tmp_path):
    """Four epochs of the tiny digits run (180 steps, `loss.backend=auto` as in `make train`) learn what the
    contrastive term optimises, measured on the M = 355 held-out digits the run never sees: the NT-Xent of two
    augmented views of each (N = 2M rows, every other row a candidate), averaged over 4 draws of the views.

    The bound comes from chance. loss_i = -ln p_i, with p_i the softmax weight of anchor i's other view among its
    N - 1 candidates. An encoder that cannot single out the other view (it is exchangeable with the N - 2 other
    rows) scores E[loss] >= ln(N - 1): logsumexp_j S_ij >= ln(N - 1) + mean_j S_ij (Jensen), and mean_j S_ij is
    the expected S_ip. We require the geometric mean of p_i to be at least 1.25 times chance, 1 / (N - 1), and
    1.25 times that of the same encoder at its seeded random initialisation: loss <= min(ln(N - 1), random) - ln 1.25.
    Measured: trained ln(N - 1) - 0.50 (the 4 draws -0.48 .. -0.54), random init ln(N - 1) - 0.03, so the bound
    is ln(N - 1) - 0.25; with learning broken (lr 0, no gradient, z detached from the loss, each positive rolled to
    another image or shuffled, the projector cut off from h, the contrastive gradient's sign flipped) runs score
    ln(N - 1) - 0.07 or more.
    """
    from protoclr.data import build_train_loader, digits, scan_image_folder
    from protoclr.trainer import train

    out = tmp_path / "run"
    cfg = tiny_cfg(out, "epochs=4", "optim.warmup_epochs=0.5", "loss.backend=auto", "eval.baselines=false")
    assert train(cfg)["step"] == 4 * (1442 // 32)
    trained = build_model(cfg)
    checkpoint.load_model_state(trained, checkpoint.load(out / "checkpoint.pth")["model"])
    torch.manual_seed(cfg.seed)
    random_init = build_model(cfg)  # the run's initialisation
    heldout = scan_image_folder(digits.export_digits() / "test")
    m = len(heldout)
    losses = {"trained": [], "random": []}
    for draw in range(4):
        loader = build_train_loader(
            heldout, [list(range(m))], cfg.aug, "cpu", backend="torch", num_workers=0, seed=draw
        )
        views, index = next(iter(loader))
        losses["trained"].append(_heldout_nt_xent(trained, views, index, cfg.loss.tau))
        losses["random"].append(_heldout_nt_xent(random_init, views, index, cfg.loss.tau))
    chance = math.log(2 * m - 1)
    mean = {k: sum(v) / len(v) for k, v in losses.items()}
    print(
        f"held-out NT-Xent (M={m}, 4 draws) minus ln(N-1)={chance:.4f}: trained {mean['trained'] - chance:+.3f} "
        f"{[round(x - chance, 3) for x in losses['trained']]}, random init {mean['random'] - chance:+.3f}"
    )
    assert mean["trained"] <= min(chance, mean["random"]) - math.log(1.25)
