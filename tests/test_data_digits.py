"""The bundled digits dataset: export layout, fixed split, idempotence, atomicity, and the real loader path on it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import file_tree
from PIL import Image

from protoclr.data import (
    AugmentConfig,
    PrototypePairSampler,
    build_eval_loader,
    build_train_loader,
    digits,
    export,
    scan_image_folder,
)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    return digits.export_digits(tmp_path_factory.mktemp("cache") / "digits")


def test_layout_and_split(digits_root):
    from sklearn.datasets import load_digits

    sk = load_digits()
    train, test = scan_image_folder(digits_root / "train"), scan_image_folder(digits_root / "test")
    assert train.classes == test.classes == [str(i) for i in range(10)]
    assert len(train) + len(test) == len(sk.target) == 1797
    assert len(test) == sum(int(np.sum(sk.target == c)) // 5 for c in range(10))
    ids = {
        split: {int(os.path.basename(p)[:4]): c for p, c in ds.samples}
        for split, ds in (("train", train), ("test", test))
    }
    assert not set(ids["train"]) & set(ids["test"])
    for split in ids:
        for i, c in ids[split].items():
            assert sk.target[i] == c
    # The split rule: every 5th image of a class (in scikit-learn's order) is a test image.
    for c in range(10):
        members = np.flatnonzero(sk.target == c)
        assert set(members[4::5]) == {i for i, cc in ids["test"].items() if cc == c}


def test_images_are_32px_rgb_png_matching_sklearn(digits_root):
    from sklearn.datasets import load_digits

    sk = load_digits()
    ds = scan_image_folder(digits_root / "train")
    for path, _ in ds.samples[::150]:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
            px = np.asarray(im).astype(np.float64)
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
        i = int(os.path.basename(path)[:4])
        # Downsampled back to 8×8, the image must match the source digit.
        small = px[..., 0].reshape(8, 4, 8, 4).mean((1, 3))
        corr = np.corrcoef(small.ravel(), sk.images[i].ravel())[0, 1]
        assert corr > 0.9


def test_export_is_idempotent(digits_root):
    before = file_tree(digits_root)
    assert digits.export_digits(digits_root) == digits_root
    assert file_tree(digits_root) == before, "a second export must write nothing"
    assert not [p for p in os.listdir(digits_root.parent) if ".tmp-" in p or ".old-" in p]


def test_incomplete_export_is_replaced(tmp_path):
    root = tmp_path / "digits"
    (root / "train" / "3").mkdir(parents=True)
    (root / "train" / "3" / "0001.png").write_bytes(b"half written")
    assert not digits.is_complete(root)
    digits.export_digits(root)
    assert digits.is_complete(root)
    assert len(scan_image_folder(root / "train")) + len(scan_image_folder(root / "test")) == 1797
    assert sorted(os.listdir(tmp_path)) == ["digits"], "no temporary folder may be left behind"


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "digits"

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_install", boom)
    with pytest.raises(OSError, match="disk full"):
        digits.export_digits(root)
    assert os.listdir(tmp_path) == []


def test_default_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PROTOCLR_DATA_DIR", str(tmp_path))
    assert digits.default_dir() == tmp_path / "digits"
    monkeypatch.delenv("PROTOCLR_DATA_DIR")
    assert digits.default_dir().parts[-3:] == (".cache", "protoclr", "digits")


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_real_read_decode_augment_path(digits_root, backend):
    ds = scan_image_folder(digits_root / "train")
    s = PrototypePairSampler(len(ds), 32, num_replicas=1, rank=0)
    loader = build_train_loader(ds, s, AugmentConfig(), "cpu", backend=backend, num_workers=1)
    views, index = next(iter(loader))
    assert len(views) == 2 and views[0].shape == (32, 3, 32, 32) and index.shape == (32,)
    images, labels, idx = next(iter(build_eval_loader(ds, 32, 64, "cpu", backend=backend, num_workers=1)))
    assert idx.tolist() == list(range(64)) and labels.tolist() == ds.targets[:64]
    assert torch.isfinite(images).all()
