"""Fashion-MNIST as a built-in source: the real export (counts, pixels = IDX bytes, idempotence) and a trainer smoke
on it; the IDX search order, corrupt and missing files, atomicity and the download switch on tiny synthetic IDX files;
data.dataset / data.subset in the config, load_splits and the eval CLI.

The real-data tests need the four IDX files (CI installs Debian's `dataset-fashion-mnist`); they skip without them.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import file_tree
from PIL import Image

from protoclr import config
from protoclr.data import ImageDataset, export, fmnist, load_splits, scan_image_folder, stratified_subset


def _index(path: str) -> int:
    return int(os.path.basename(path)[:5])


# ------------------------------------------------------------------------------------------ the real data


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real export, written once for the module into a fresh $PROTOCLR_DATA_DIR (the ~15 s of this file)."""
    idx_dir = fmnist.find_idx_dir()
    if idx_dir is None:
        pytest.skip(f"Fashion-MNIST IDX files not found; {fmnist.HOW_TO_GET}")
    data_dir = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROTOCLR_DATA_DIR", str(data_dir))
        root = fmnist.export_fmnist(progress=False)
    assert root == data_dir / "fmnist"
    return root, idx_dir


def _raw(idx_dir: Path, name: str, header: int) -> np.ndarray:
    """An IDX file's data bytes, read without protoclr's parser."""
    path = idx_dir / name if (idx_dir / name).is_file() else idx_dir / f"{name}.gz"
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return np.frombuffer(data, dtype=np.uint8, offset=header)


def test_real_counts_and_classes(real):
    root, _ = real
    train, test = scan_image_folder(root / "train"), scan_image_folder(root / "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.classes == test.classes == [str(c) for c in range(10)]
    assert np.bincount(train.targets).tolist() == [6000] * 10
    assert np.bincount(test.targets).tolist() == [1000] * 10
    meta = json.loads((root / ".protoclr_fmnist.json").read_text())
    assert meta["train"] == 60000 and meta["test"] == 10000 and meta["classes"][9] == "Ankle boot"
    assert sorted(os.listdir(root.parent)) == ["fmnist"], "no temporary folder may be left behind"


def test_real_pixels_and_labels_equal_the_idx_bytes(real):
    root, idx_dir = real
    for split, (img_name, lab_name) in fmnist.IDX_FILES.items():
        labels = _raw(idx_dir, lab_name, 8)
        images = _raw(idx_dir, img_name, 16).reshape(-1, 28, 28)
        ds = scan_image_folder(root / split)
        idx = np.array([_index(p) for p, _ in ds.samples])
        assert sorted(idx.tolist()) == list(range(len(labels)))  # every IDX position exactly once
        assert (labels[idx] == np.array(ds.targets)).all()  # label folder = IDX label, all 70,000
        for path, _ in ds.samples[::997]:
            with Image.open(path) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == (28, 28)
                px = np.asarray(im)
            assert (px == images[_index(path)][:, :, None]).all()  # grey replicated, bytes unchanged


def test_real_second_export_writes_nothing(real, monkeypatch):
    root, _ = real
    marker = root / ".protoclr_fmnist.json"
    before, mtime = file_tree(root), marker.stat().st_mtime_ns
    monkeypatch.setattr(fmnist, "find_idx_dir", lambda *a, **k: pytest.fail("a finished export needs no IDX files"))
    assert fmnist.export_fmnist(cache_dir=root) == root
    assert marker.stat().st_mtime_ns == mtime
    assert file_tree(root) == before


def test_real_load_splits_subset(real, monkeypatch):
    root, _ = real
    monkeypatch.setenv("PROTOCLR_DATA_DIR", str(root.parent))
    cfg = config.resolve(None, {}, ["data.dataset=fmnist", "data.subset=1000"])
    train, val, desc = load_splits(cfg.data, seed=3)
    assert len(train) == 1000 and np.bincount(train.targets).tolist() == [100] * 10
    assert len(val) == 10000 and val.root == root / "test"
    assert "subset of 1000 of the 60000" in desc
    again, _, _ = load_splits(cfg.data, seed=3)
    other, _, _ = load_splits(cfg.data, seed=4)
    assert again.samples == train.samples and other.samples != train.samples


def test_real_trainer_smoke(real, tmp_path, monkeypatch):
    """Two steps of the digits preset's tiny configuration on 256 images, kNN on the 10,000 test images."""
    from protoclr.trainer import train
    from tests.helpers import tiny_cfg

    root, _ = real
    monkeypatch.setenv("PROTOCLR_DATA_DIR", str(root.parent))
    out = tmp_path / "out"
    cfg = tiny_cfg(out, "data.dataset=fmnist", "data.subset=256", "epochs=1", "batch_size=64", max_steps=2)
    res = train(cfg)
    assert res["step"] == 2 and res["top1"] is not None and 0 <= res["top1"] <= 100
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s["type"] == "step"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    log = (out / "train.log").read_text()
    assert "stratified subset of 256 of the 60000" in log and "10000 held-out images" in log


# -------------------------------------------------------------------------------- synthetic IDX files


def _idx_bytes(arr: np.ndarray) -> bytes:
    return b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write_idx(folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    """The four IDX files of a tiny Fashion-MNIST (every class twice in train, once in test); returns the arrays."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        for name, arr in zip(fmnist.IDX_FILES[split], (images, labels)):
            if gz:
                with gzip.open(folder / f"{name}.gz", "wb") as f:
                    f.write(_idx_bytes(arr))
            else:
                (folder / name).write_bytes(_idx_bytes(arr))
        arrays[split] = (images, labels)
    return arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere: an empty data dir, no $PROTOCLR_FMNIST_DIR, Debian's folder pointed elsewhere."""
    monkeypatch.setenv("PROTOCLR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(fmnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", tmp_path / "debian")
    return tmp_path


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_and_load_split(tmp_path, gz):
    arrays = _write_idx(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = fmnist.load_split(tmp_path, split)
        assert (images == arrays[split][0]).all() and (labels == arrays[split][1]).all()


def test_search_order(isolated, monkeypatch):
    user, env, tv_root = isolated / "user", isolated / "env", isolated / "tv"
    for folder in (user, env, fmnist.DEBIAN_DIR, isolated / "data" / "FashionMNIST" / "raw"):
        _write_idx(folder, gz=folder != env)  # the env folder holds un-gzipped files
    _write_idx(tv_root / "FashionMNIST" / "raw")
    monkeypatch.setenv(fmnist.ENV_VAR, str(env))
    assert fmnist.find_idx_dir(user) == user  # user path > env var
    assert fmnist.find_idx_dir(str(tv_root)) == tv_root / "FashionMNIST" / "raw"  # a torchvision root
    assert fmnist.find_idx_dir() == env  # env var > Debian
    monkeypatch.delenv(fmnist.ENV_VAR)
    assert fmnist.find_idx_dir("") == fmnist.DEBIAN_DIR  # Debian > torchvision raw in the data dir
    monkeypatch.setattr(fmnist, "DEBIAN_DIR", isolated / "nowhere")
    assert fmnist.find_idx_dir() == isolated / "data" / "FashionMNIST" / "raw"
    assert fmnist.find_idx_dir(data_dir=isolated / "empty") is None


def test_explicit_place_without_files_is_an_error(isolated, monkeypatch):
    _write_idx(fmnist.DEBIAN_DIR)  # never silently used instead of what the user named
    _write_idx(isolated / "half")
    (isolated / "half" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="data.fmnist_src=.*half.*holds no Fashion-MNIST IDX files"):
        fmnist.find_idx_dir(isolated / "half")
    monkeypatch.setenv(fmnist.ENV_VAR, str(isolated / "missing"))
    with pytest.raises(FileNotFoundError, match="PROTOCLR_FMNIST_DIR=.*missing"):
        fmnist.export_fmnist()


def test_missing_data_says_how_to_get_it(isolated):
    with pytest.raises(FileNotFoundError) as e:
        fmnist.export_fmnist()
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("apt-get install dataset-fashion-mnist", "PROTOCLR_FMNIST_DIR", "data.fmnist_src", "data.download"):
        assert part in msg
    assert not (isolated / "data").exists() or os.listdir(isolated / "data") == []


@pytest.mark.parametrize("damage", ["truncated_gz", "garbage_gz", "bad_magic", "short_data", "labels_mismatch"])
def test_corrupt_file_is_named(isolated, damage):
    src = isolated / "src"
    _write_idx(src)
    path = src / "train-images-idx3-ubyte.gz"
    raw = gzip.open(path).read()
    if damage == "truncated_gz":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage_gz":
        path.write_bytes(b"\x1f\x8b" + b"not gzip at all" * 10)
    elif damage == "bad_magic":
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    elif damage == "short_data":
        path.write_bytes(gzip.compress(raw[:-28]))
    else:
        path = src / "train-labels-idx1-ubyte.gz"
        path.write_bytes(gzip.compress(_idx_bytes(np.zeros(19, np.uint8))))
    with pytest.raises(ValueError, match=path.name):
        fmnist.export_fmnist(src)
    assert not (isolated / "data").exists() or os.listdir(isolated / "data") == [], "nothing may be written"


def test_synthetic_export_layout_and_pixels(isolated):
    arrays = _write_idx(isolated / "src", gz=False)
    root = fmnist.export_fmnist(isolated / "src", progress=False)
    assert root == isolated / "data" / "fmnist" and fmnist.is_complete(root)
    for split, (images, labels) in arrays.items():
        ds = scan_image_folder(root / split)
        assert ds.classes == [str(c) for c in range(10)] and len(ds) == len(labels)
        for path, c in ds.samples:
            i = _index(path)
            assert labels[i] == c and os.path.basename(path) == f"{i:05d}.png"
            with Image.open(path) as im:
                assert im.mode == "RGB" and (np.asarray(im) == images[i][:, :, None]).all()


def test_interrupted_export_is_redone(isolated, caplog):
    _write_idx(isolated / "src")
    root = isolated / "data" / "fmnist"
    (root / "train" / "3").mkdir(parents=True)  # a folder without its marker: a crashed or foreign write
    (root / "train" / "3" / "00001.png").write_bytes(b"half written")
    stale = isolated / "data" / ".fmnist.tmp-dead"  # the temporary folder of a killed export
    (stale / "train" / "0").mkdir(parents=True)
    assert not fmnist.is_complete(root)
    with caplog.at_level(logging.WARNING, logger="protoclr.data.export"):
        assert fmnist.export_fmnist(isolated / "src", progress=False) == root
    assert fmnist.is_complete(root)
    assert len(scan_image_folder(root / "train")) == 20 and len(scan_image_folder(root / "test")) == 10
    assert ".fmnist.tmp-dead" in caplog.text  # named, not deleted: it may be another process's live export
    assert sorted(os.listdir(root.parent)) == [".fmnist.tmp-dead", "fmnist"]


def test_failed_export_leaves_nothing(isolated, monkeypatch):
    _write_idx(isolated / "src")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_install", boom)
    with pytest.raises(OSError, match="disk full"):
        fmnist.export_fmnist(isolated / "src", progress=False)
    assert os.listdir(isolated / "data") == []


def test_download_only_when_asked(isolated, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            _write_idx(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        fmnist.export_fmnist()
    assert calls == []
    root = fmnist.export_fmnist(download=True, progress=False)
    assert calls == [(str(isolated / "data"), True)] and fmnist.is_complete(root)
    assert fmnist.find_idx_dir() == isolated / "data" / "FashionMNIST" / "raw"  # found next time, no download


# ------------------------------------------------------------------------------- config, subset, CLIs


def test_config_dataset_keys():
    cfg = config.resolve(None, {}, ["data.dataset=fmnist", "data.fmnist_src=/x", "data.download=true"])
    assert (cfg.data.dataset, cfg.data.fmnist_src, cfg.data.download, cfg.data.subset) == ("fmnist", "/x", True, 0)
    assert config.Config().data.dataset == "auto"
    with pytest.raises(ValueError, match="data.dataset must be one of"):
        config.resolve(None, {}, ["data.dataset=bogus"])
    with pytest.raises(ValueError, match="data.subset must be >= 0"):
        config.resolve(None, {}, ["data.subset=-1"])
    with pytest.raises(ValueError, match="data.root must be '' with data.dataset='fmnist'"):
        config.resolve(None, {}, ["data.dataset=fmnist", "data.root=/some/folder"])
    assert config.data_flag("fmnist") == {"data.dataset": "fmnist", "data.root": ""}
    assert config.data_flag("/data/x") == {"data.dataset": "auto", "data.root": "/data/x"}


def test_stratified_subset_is_stratified_and_deterministic():
    sizes = [50, 30, 15, 5]  # imbalanced: shares 25, 15, 7.5, 2.5 of 50
    samples = [(f"/d/{c}/{i:03d}.png", c) for c, n in enumerate(sizes) for i in range(n)]
    ds = ImageDataset(Path("/d"), samples, ["a", "b", "c", "d"])
    sub = stratified_subset(ds, 50, seed=0)
    assert np.bincount(sub.targets, minlength=4).tolist() == [25, 15, 8, 2]  # largest remainder, tie: lower class
    assert sub.samples == sorted(sub.samples, key=samples.index) and set(sub.samples) <= set(samples)
    assert sub.classes == ds.classes
    assert stratified_subset(ds, 50, seed=0).samples == sub.samples
    assert stratified_subset(ds, 50, seed=1).samples != sub.samples
    assert stratified_subset(ds, 100, seed=0) is ds
    for n in (0, 101):
        with pytest.raises(ValueError, match=f"data.subset={n} must be in 1..100"):
            stratified_subset(ds, n, seed=0)


def test_eval_cli_data_fmnist(isolated, capsys):
    from protoclr.eval.__main__ import main as eval_main

    _write_idx(isolated / "src")
    fmnist.export_fmnist(isolated / "src", progress=False)  # into $PROTOCLR_DATA_DIR/fmnist
    args = ["knn", "--features", "pixels", "--data", "fmnist", "--k", "3", "aug.image_size=8"]
    res = eval_main([*args, "data.num_workers=0", "data.backend=torch", "data.subset=10"])
    assert res["n_test"] == 10 and math.isfinite(res["top1"])
    assert "stratified subset of 10 of the 20" in capsys.readouterr().out
