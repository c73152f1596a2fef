"""The bundled default dataset: scikit-learn's 8×8 digits, exported once as an ImageFolder of PNG files.

`load_digits()` ships inside scikit-learn (nothing is downloaded). Exporting it as real image files means the
default run exercises the same read → decode → augment path as any user dataset. Images are upscaled to 32×32
(bicubic) and stored as RGB (grey replicated), so the CIFAR-sized defaults apply unchanged.

Split: per class, every 5th image in scikit-learn's order is a test image (≈ 80/20: 1442 train, 355 test
images); this is fixed by construction, independent of any random generator or library version.

The export is atomic (export.py): files are written into a temporary sibling folder that is renamed into place only
when complete (with a marker file), so a crash or a concurrent export never leaves half a dataset, and a second call
finds the marker and writes nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from . import export

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
TEST_EVERY = 5
_VERSION = 1
_MARKER = ".protoclr_digits.json"


def default_dir() -> Path:
    """$PROTOCLR_DATA_DIR/digits when that variable is set, else ~/.cache/protoclr/digits."""
    return export.default_dir("digits")


def _manifest() -> dict:
    return {"version": _VERSION, "image_size": IMAGE_SIZE, "test_every": TEST_EVERY}


def is_complete(root: Path) -> bool:
    """Whether `root` holds a finished export of this version."""
    return export.is_complete(root, _MARKER, _manifest())


def export_digits(cache_dir: str | os.PathLike | None = None) -> Path:
    """Export the digits data as `train/` and `test/` ImageFolders (class folders 0..9, 32×32 RGB PNG files).

    Args:
        cache_dir: folder that will hold train/ and test/; default `default_dir()`.

    Returns:
        The folder (`cache_dir`), holding `train/<label>/<sklearn index:04d>.png` and `test/...`.

    Raises:
        OSError: the folder cannot be written.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    if is_complete(root):
        return root
    counts = export.export_atomically(root, _MARKER, _manifest(), _write)
    log.info("exported the digits data to %s (%d train, %d test images)", root, counts["train"], counts["test"])
    return root


def _write(tmp: Path) -> dict:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    labels = np.asarray(digits.target, dtype=np.int64)
    counts = {"train": 0, "test": 0}
    seen = np.zeros(10, dtype=np.int64)
    for i, (img, y) in enumerate(zip(images, labels)):
        split = "test" if seen[y] % TEST_EVERY == TEST_EVERY - 1 else "train"
        seen[y] += 1
        counts[split] += 1
        px = np.clip(np.rint(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        im = Image.fromarray(px, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        out = tmp / split / str(int(y))
        out.mkdir(parents=True, exist_ok=True)
        im.convert("RGB").save(out / f"{i:04d}.png", optimize=False)
    return counts
