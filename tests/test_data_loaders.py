"""Both training/eval loaders (DALI in CPU mode, torchvision v2): output contract, determinism, parity between the
two, sharding, and bad data."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from protoclr.data import AugmentConfig, PrototypePairSampler, build_eval_loader, build_train_loader, scan_image_folder
from protoclr.data.build import resolve_backend
from protoclr.data.dali import dali_available

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(dali_available() is not None, reason="DALI not importable")),
    "torch",
]
MEAN = torch.tensor(AugmentConfig().mean).view(1, 3, 1, 1)
STD = torch.tensor(AugmentConfig().std).view(1, 3, 1, 1)
# Exact identity configs: no crop (scale 1, ratio 1 on square images), no flip, no colour change, no blur.
IDENTITY = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur="off")


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colourful, smooth content (random gradients + a blob) so crops, jitter and blur all change it visibly."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        chans.append(0.5 + 0.4 * np.sin(3 * (a * xx + b * yy) + c * 6))
    img = np.stack(chans, -1)
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] *= rng.uniform(0.2, 1.0, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _write_folder(root, n_per_class=16, classes=3, square=32, seed=0):
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n_per_class):
            if square:
                h = w = square
            else:
                h, w = int(rng.integers(36, 64)), int(rng.integers(36, 64))
            fmt = "png" if i % 2 else "jpg"
            Image.fromarray(_smooth_image(rng, h, w)).save(root / f"c{c}" / f"{i:03d}.{fmt}", quality=95)
    return root


@pytest.fixture(scope="module")
def square_folder(tmp_path_factory):
    """48 square 32×32 images (PNG and JPEG), 3 classes."""
    return _write_folder(tmp_path_factory.mktemp("square"))


@pytest.fixture(scope="module")
def varied_folder(tmp_path_factory):
    """48 non-square images of 36..63 px, 3 classes."""
    return _write_folder(tmp_path_factory.mktemp("varied"), square=0, seed=1)


def _damaged_png() -> bytes:
    """A PNG that passes the header screen (IEND present) but whose compressed data is broken: only a decode can
    tell, which makes the DALI loader take its recovery path."""
    buf = io.BytesIO()
    Image.fromarray(_smooth_image(np.random.default_rng(9), 32, 32)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    mid = len(data) // 2
    data[mid : mid + 40] = b"\x00" * 40
    return bytes(data)


BAD_FILES = {
    "c0/000_empty.png": b"",
    "c0/001_garbage.jpg": b"this is not an image" * 20,
    "c1/000_truncated.jpg": None,  # filled in the fixture: a truncated JPEG
    "c2/000_damaged.png": None,  # filled in the fixture: damaged IDAT
}


@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory):
    """44 good images + 4 bad ones (48 in all, so every image is in some batch of 8)."""
    root = _write_folder(tmp_path_factory.mktemp("corrupt"), n_per_class=15, classes=3, seed=2)
    (root / "c0" / "014.jpg").unlink()
    jpg = io.BytesIO()
    Image.fromarray(_smooth_image(np.random.default_rng(3), 32, 32)).save(jpg, "JPEG")
    content = dict(BAD_FILES)
    content["c1/000_truncated.jpg"] = jpg.getvalue()[: len(jpg.getvalue()) // 2]
    content["c2/000_damaged.png"] = _damaged_png()
    for rel, data in content.items():
        (root / rel).write_bytes(data)
    return root


def _collect(loader, epochs=(0,)):
    out = []
    for e in epochs:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(e)
        for views, index in loader:
            out.append(([v.clone() for v in views], index.clone()))
    return out


def _decoded(path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float()


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_output_contract(backend, varied_folder):
    ds = scan_image_folder(varied_folder)
    aug = AugmentConfig(image_size=32, n_small_crops=2, small_size=16, blur="on")
    sampler = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0, seed=1)
    loader = build_train_loader(ds, sampler, aug, torch.device("cpu"), backend=backend, num_workers=2, seed=0)
    assert loader.backend == backend
    assert len(loader) == len(sampler) == 6
    expected = list(sampler)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    got = _collect(loader)
    assert len(got) == 6
    for (views, index), want in zip(got, expected):
        assert len(views) == 4
        for v, size in zip(views, (32, 32, 16, 16)):
            assert v.shape == (8, 3, size, size) and v.dtype == torch.float32 and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(v).all()
            assert (v >= lo - 1e-4).all() and (v <= hi + 1e-4).all()
            assert v.std() > 0.1  # not blank
        assert index.dtype == torch.int64 and index.tolist() == want
    assert loader.skipped == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_deterministic_per_seed(backend, varied_folder):
    ds = scan_image_folder(varied_folder)
    aug = AugmentConfig(image_size=24, blur="on")

    def run(seed, epochs=(0, 1)):
        s = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0, seed=0)
        return _collect(build_train_loader(ds, s, aug, "cpu", backend=backend, num_workers=2, seed=seed), epochs)

    a, b, c = run(0), run(0), run(1)
    for (va, ia), (vb, ib) in zip(a, b):
        assert torch.equal(ia, ib)
        for x, y in zip(va, vb):
            assert torch.equal(x, y)
    assert not torch.equal(a[0][0][0], c[0][0][0]), "another seed must give other augmentations"
    assert not torch.equal(a[0][0][0], a[0][0][1]), "the two views of a batch must differ"
    # Epoch 1 alone (e.g. after a resume) equals epoch 1 of the continuous run.
    alone = run(0, epochs=(1,))
    assert all(torch.equal(x, y) for x, y in zip(alone[0][0], a[len(a) // 2][0]))


def test_torch_loader_independent_of_worker_count(square_folder):
    ds = scan_image_folder(square_folder)
    aug = AugmentConfig()

    def run(workers):
        s = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0, seed=0)
        return _collect(build_train_loader(ds, s, aug, "cpu", backend="torch", num_workers=workers, seed=5))

    for (va, ia), (vb, ib) in zip(run(0), run(2)):
        assert torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(va, vb))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", [{}, {"flip_p": 1.0}, {"grayscale_p": 1.0}])
def test_identity_flip_grayscale_exact(backend, extra, square_folder):
    """With the random parts pinned, both loaders must reproduce the decoded image, its mirror, or its luma."""
    ds = scan_image_folder(square_folder)
    aug = AugmentConfig(image_size=32, **{**IDENTITY, **extra})
    s = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0)
    (views, index), *_ = _collect(build_train_loader(ds, s, aug, "cpu", backend=backend, num_workers=1))
    want = torch.stack([_decoded(ds.samples[i][0]) for i in index.tolist()])
    if extra.get("flip_p"):
        want = want.flip(-1)
    if extra.get("grayscale_p"):
        luma = (0.299 * want[:, 0] + 0.587 * want[:, 1] + 0.114 * want[:, 2]).unsqueeze(1)
        want = luma.expand(-1, 3, -1, -1)
    want = (want / 255 - MEAN) / STD
    # Luma is rounded to uint8 in both; DALI goes through YIQ and back (two roundings): allow 2 grey levels.
    tol = 1e-4 if not extra.get("grayscale_p") else 2.01 / 255 / 0.224
    for v in views:
        err = (v - want).abs().max().item()
        assert err <= tol, f"max error {err}"
    if extra.get("grayscale_p"):
        px = views[0] * STD + MEAN
        assert (px[:, 0] - px[:, 1]).abs().max() < 1e-5 and (px[:, 1] - px[:, 2]).abs().max() < 1e-5


def _view_stats(views: list[torch.Tensor]) -> dict[str, float | np.ndarray]:
    x = torch.cat(views) * STD + MEAN  # back to [0, 1] pixels
    grey = ((x[:, 0] - x[:, 1]).abs().amax((1, 2)) < 0.02) & ((x[:, 1] - x[:, 2]).abs().amax((1, 2)) < 0.02)
    return {
        "mean": x.mean((0, 2, 3)).numpy(),
        "std": x.std((0, 2, 3)).numpy(),
        "grey": grey.float().mean().item(),
        "contrast": x.std((1, 2, 3)).mean().item(),  # per-view spread: crop scale, jitter
        "sharpness": (x[..., 1:] - x[..., :-1]).abs().mean().item(),  # blur and crop zoom
    }


@pytest.mark.skipif(dali_available() is not None, reason="DALI not importable")
def test_loaders_statistically_similar(varied_folder):
    """The same config gives augmentations with the same statistics in both loaders (SPEC §2 parity)."""
    ds = scan_image_folder(varied_folder)
    aug = AugmentConfig(image_size=32, blur="on")
    stats = {}
    epochs = 8
    for backend in ("dali", "torch"):
        s = PrototypePairSampler(len(ds), 16, num_replicas=1, rank=0)
        got = _collect(build_train_loader(ds, s, aug, "cpu", backend=backend, num_workers=2), epochs=range(epochs))
        stats[backend] = _view_stats([v for views, _ in got for v in views])
    d, t = stats["dali"], stats["torch"]
    print({k: (d[k], t[k]) for k in d})
    assert np.abs(d["mean"] - t["mean"]).max() < 0.04
    assert np.abs(d["std"] - t["std"]).max() < 0.04
    n_views = epochs * len(ds) * aug.views
    for backend in ("dali", "torch"):  # grayscale_p within 4 binomial standard deviations
        assert abs(stats[backend]["grey"] - aug.grayscale_p) < 4 * (0.2 * 0.8 / n_views) ** 0.5, backend
    assert abs(d["contrast"] - t["contrast"]) < 0.03
    assert abs(d["sharpness"] - t["sharpness"]) / t["sharpness"] < 0.15


def _jitter_stats(x: torch.Tensor) -> np.ndarray:
    """Per-view mean / std / chroma (max - min channel), their means and spreads over views; x in [0, 1] pixels."""
    m, s, chroma = x.mean((1, 2, 3)), x.std((1, 2, 3)), (x.amax(1) - x.amin(1)).mean((1, 2))
    return np.array([m.mean(), m.std(), s.mean(), s.std(), chroma.mean(), chroma.std()])


@pytest.mark.skipif(dali_available() is not None, reason="DALI not importable")
@pytest.mark.parametrize("component", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_component_matches(component, square_folder, tmp_path):
    """Each colour-jitter factor alone changes the views the same way in both loaders (not only all together)."""
    strength = {"brightness": (0.8, 0, 0, 0), "contrast": (0, 0.8, 0, 0), "saturation": (0, 0, 0.8, 0)}
    strength["hue"] = (0, 0, 0, 0.4)
    if component == "hue":  # solid red: a hue turn shows as a change of the dominant channel
        (tmp_path / "red").mkdir()
        for i in range(64):
            Image.new("RGB", (16, 16), (200, 30 + i // 4, 30)).save(tmp_path / "red" / f"{i}.png")
        ds = scan_image_folder(tmp_path)
    else:
        ds = scan_image_folder(square_folder)
    out = {}
    for name, kw in (("none", {}), ("on", dict(jitter=strength[component], jitter_p=1.0))):
        aug = AugmentConfig(image_size=16, **{**IDENTITY, **kw})
        for backend in ("dali", "torch"):
            s = PrototypePairSampler(len(ds), 16, num_replicas=1, rank=0)
            got = _collect(build_train_loader(ds, s, aug, "cpu", backend=backend, num_workers=2), epochs=range(4))
            out[name, backend] = torch.cat([v for views, _ in got for v in views]) * STD + MEAN
    if component == "hue":
        dom = {k: torch.bincount(x.mean((2, 3)).argmax(1), minlength=3) / len(x) for k, x in out.items()}
        print(dom)
        assert (dom["on", "dali"] - dom["on", "torch"]).abs().max() < 0.12  # 512 views: 4 standard deviations
        for b in ("dali", "torch"):  # U(±144°) of red: red stays dominant for |turn| < 60°, ~42% of views
            assert dom["none", b][0] == 1 and 0.3 < dom["on", b][0] < 0.55 and dom["on", b][1:].min() > 0.18
        return
    st = {k: _jitter_stats(x) for k, x in out.items()}
    print({k: v.round(3) for k, v in st.items()})
    assert np.abs(st["on", "dali"] - st["on", "torch"]).max() < 0.04
    moved = {"brightness": 1, "contrast": 3, "saturation": 5}[component]  # the spread this factor widens
    for b in ("dali", "torch"):
        assert st["on", b][moved] > st["none", b][moved] + 0.04, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_loaders_cover_each_index_once(backend, square_folder):
    ds = scan_image_folder(square_folder)
    aug = AugmentConfig(image_size=16)
    seen = []
    for rank in range(2):
        s = PrototypePairSampler(len(ds), 8, num_replicas=2, rank=rank, seed=3)
        s.set_prototypes(torch.tensor(ds.targets))
        loader = build_train_loader(ds, s, aug, "cpu", backend=backend, num_workers=1)
        assert len(loader) == 3
        seen += [i for _, index in _collect(loader, epochs=(2,)) for i in index.tolist()]
    assert sorted(seen) == list(range(len(ds)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_uses_eval_size_not_the_training_crop(backend, square_folder):
    from protoclr import config
    from protoclr.data import sharded_eval_loader

    ds = scan_image_folder(square_folder)
    for overrides, side in (([], 16), (["aug.eval_size=24"], 24)):
        cfg = config.resolve(
            None, {}, ["aug.image_size=16", f"data.backend={backend}", "data.num_workers=1", *overrides]
        )
        images = next(iter(sharded_eval_loader(ds, cfg, torch.device("cpu"))))[0]
        assert images.shape[1:] == (3, side, side)
    with pytest.raises(ValueError, match="eval_size"):
        AugmentConfig(eval_size=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_files_skipped_counted_reported_once(backend, corrupt_folder, caplog):
    ds = scan_image_folder(corrupt_folder)
    assert len(ds) == 48
    bad = {i for i, (p, _) in enumerate(ds.samples) if any(p.endswith(k) for k in BAD_FILES)}
    assert len(bad) == 4
    s = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0)
    loader = build_train_loader(ds, s, AugmentConfig(image_size=16), "cpu", backend=backend, num_workers=2)
    for epoch in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            got = _collect(loader, epochs=(epoch,))
        assert len(got) == 6
        for views, index in got:
            assert all(v.shape == (8, 3, 16, 16) and torch.isfinite(v).all() for v in views)
            assert not bad & set(index.tolist()), "a bad file's index must never be returned"
        assert loader.skipped == 4
        warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
        assert len(warnings) == 1 and "skipped 4" in warnings[0].getMessage()
        if backend == "dali":
            # The damaged PNG passes the header screen: only the recovery path (decode failure, diagnosis,
            # rebuild) can have found it, and the loader remembers it for later epochs.
            assert [p for p in loader._bad if p.endswith("000_damaged.png")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_batch_unreadable_borrows_an_image(backend, corrupt_folder):
    ds = scan_image_folder(corrupt_folder)
    bad = sorted(i for i, (p, _) in enumerate(ds.samples) if any(p.endswith(k) for k in BAD_FILES))
    good = [i for i in range(len(ds)) if i not in bad]
    batches = [bad, good[:4]]  # any batch sampler works, not only PrototypePairSampler
    loader = build_train_loader(ds, batches, AugmentConfig(image_size=16), "cpu", backend=backend, num_workers=1)
    got = [(views, index) for views, index in loader]
    assert len(got) == 2 and loader.skipped == 4
    first = got[0][1].tolist()
    assert len(set(first)) == 1 and first[0] not in bad
    assert got[1][1].tolist() == good[:4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_order_labels_and_parity(backend, square_folder):
    ds = scan_image_folder(square_folder)
    idx = torch.tensor([5, 0, 47, 20, 21, 3, 9])
    loader = build_eval_loader(ds, 32, 3, "cpu", indices=idx, backend=backend, num_workers=1)
    assert len(loader) == 3
    images, labels, index = map(torch.cat, zip(*list(loader)))
    assert index.tolist() == idx.tolist() and index.dtype == torch.int64
    assert labels.tolist() == [ds.targets[i] for i in idx.tolist()]
    assert images.shape == (7, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
    want = (torch.stack([_decoded(ds.samples[i][0]) for i in idx.tolist()]) / 255 - MEAN) / STD
    assert (images - want).abs().max() < 1e-4  # 32-px images at image_size 32: no resize, no crop
    assert list(build_eval_loader(ds, 32, 3, "cpu", indices=[], backend=backend, num_workers=0)) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_resize_crop_and_corrupt(backend, corrupt_folder, varied_folder):
    ds = scan_image_folder(varied_folder)
    images, labels, index = next(iter(build_eval_loader(ds, 40, 48, "cpu", backend=backend, num_workers=1)))
    assert images.shape == (48, 3, 40, 40) and index.tolist() == list(range(48))
    ds = scan_image_folder(corrupt_folder)
    loader = build_eval_loader(ds, 16, 16, "cpu", backend=backend, num_workers=1)
    images, labels, index = map(torch.cat, zip(*list(loader)))
    assert index.tolist() == list(range(48)) and loader.skipped == 4
    bad = torch.tensor([any(p.endswith(k) for k in BAD_FILES) for p, _ in ds.samples])
    assert (images[bad] == 0).all()
    assert (images[~bad].flatten(1).std(1) > 0.05).all()


def test_eval_loaders_agree_after_resize(varied_folder):
    if dali_available() is not None:
        pytest.skip("DALI not importable")
    ds = scan_image_folder(varied_folder)
    out = {b: next(iter(build_eval_loader(ds, 24, 48, "cpu", backend=b, num_workers=1)))[0] for b in ("dali", "torch")}
    # Resampling kernels and sub-pixel crop offsets differ slightly between DALI and torchvision: sharp edges move
    # by a fraction of a pixel. The images must still agree closely (a mirrored image would give a mean error ~0.4).
    diff = (out["dali"] - out["torch"]).abs()
    assert diff.mean() < 0.05 and torch.quantile(diff.flatten(), 0.99) < 0.5
    assert (out["dali"] - out["torch"].flip(-1)).abs().mean() > 4 * diff.mean()


def test_backend_resolution(monkeypatch):
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == ("dali" if dali_available() is None else "torch")
    monkeypatch.setenv("PROTOCLR_DATA_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("opencv", torch.device("cpu"))


def test_build_rejects_mismatched_sampler(square_folder):
    ds = scan_image_folder(square_folder)
    s = PrototypePairSampler(len(ds) + 2, 8, num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="num_images"):
        build_train_loader(ds, s, AugmentConfig(), "cpu", backend="torch")
    with pytest.raises(ValueError, match="indices"):
        build_eval_loader(ds, 32, 8, "cpu", indices=torch.tensor([0, 48]), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_position_tracks_delivered_batches(backend, square_folder):
    ds = scan_image_folder(square_folder)
    s = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0)
    loader = build_train_loader(ds, s, AugmentConfig(image_size=16), "cpu", backend=backend, num_workers=2)
    it = iter(loader)
    next(it)
    next(it)
    assert s.state_dict()["position"] == 2  # not what the prefetching loader has pulled from the sampler
    it.close()


# ---------------------------------------------------------------------------------------------------------------------
# GPU (run by bench/gpu_check.sh with `pytest -m gpu`): nvJPEG decoding and device placement
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_train_and_eval_loaders(backend, varied_folder):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device())
    ds = scan_image_folder(varied_folder)
    aug = AugmentConfig(image_size=32, blur="on", n_small_crops=1, small_size=16)
    s = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0)
    loader = build_train_loader(ds, s, aug, dev, backend=backend, num_workers=2)
    got = _collect(loader, epochs=range(4))
    assert len(got) == 4 * len(s)
    for views, index in got:
        assert index.device == dev and index.dtype == torch.int64
        for v, size in zip(views, (32, 32, 16)):
            assert v.device == dev and v.shape == (8, 3, size, size) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(v).all()
    # Same statistics as the CPU torchvision loader (the reference augmentation).
    gpu_stats = _view_stats([v.cpu() for views, _ in got for v in views[:2]])
    s_cpu = PrototypePairSampler(len(ds), 8, num_replicas=1, rank=0)
    aug_cpu = AugmentConfig(image_size=32, blur="on")
    cpu = _collect(build_train_loader(ds, s_cpu, aug_cpu, "cpu", backend="torch", num_workers=2), epochs=range(4))
    cpu_stats = _view_stats([v for views, _ in cpu for v in views])
    assert np.abs(gpu_stats["mean"] - cpu_stats["mean"]).max() < 0.05
    assert np.abs(gpu_stats["std"] - cpu_stats["std"]).max() < 0.05
    images, labels, index = next(iter(build_eval_loader(ds, 32, 16, dev, backend=backend, num_workers=1)))
    assert images.device == dev and labels.device == dev and index.tolist() == list(range(16))
    assert images.is_contiguous(memory_format=torch.channels_last)
