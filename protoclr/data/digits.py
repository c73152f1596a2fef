"""The bundled default dataset: scikit-learn's 8×8 digits, exported once as an ImageFolder of PNG files.

`load_digits()` ships inside scikit-learn (nothing is downloaded). Exporting it as real image files means the
default run exercises the same read → decode → augment path as any user dataset. Images are upscaled to 32×32
(bicubic) and stored as RGB (grey replicated), so the CIFAR-sized defaults apply unchanged.

Split: per class, every 5th image in scikit-learn's order is a test image (≈ 80/20: 1442 train, 355 test
images); this is fixed by construction, independent of any random generator or library version.

The export is atomic: files are written into a temporary sibling folder that is renamed into place only when
complete (with a marker file), so a crash or a concurrent export never leaves half a dataset, and a second call
finds the marker and writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
TEST_EVERY = 5
_VERSION = 1
_MARKER = ".protoclr_digits.json"


def default_dir() -> Path:
    """$PROTOCLR_DATA_DIR/digits when that variable is set, else ~/.cache/protoclr/digits."""
    base = os.environ.get("PROTOCLR_DATA_DIR")
    if base:
        return Path(base).expanduser() / "digits"
    return Path.home() / ".cache" / "protoclr" / "digits"


def _manifest() -> dict:
    return {"version": _VERSION, "image_size": IMAGE_SIZE, "test_every": TEST_EVERY}


def is_complete(root: Path) -> bool:
    """Whether `root` holds a finished export of this version."""
    try:
        meta = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    want = _manifest()
    return all(meta.get(k) == v for k, v in want.items())


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
    from PIL import Image
    from sklearn.datasets import load_digits

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should be as readable as any folder
    try:
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
        (tmp / _MARKER).write_text(json.dumps({**_manifest(), **counts}))
        _install(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported the digits data to %s (%d train, %d test images)", root, counts["train"], counts["test"])
    return root


def _install(tmp: Path, root: Path) -> None:
    """Move the finished export into place; an incomplete or outdated folder there is replaced, a complete one
    written meanwhile by another process is kept."""
    try:
        os.rename(tmp, root)
        return
    except OSError:
        if is_complete(root):  # another process finished first
            return
    # `root` exists but is incomplete or outdated: swap it out, then remove it.
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.rename(root, old / "stale")
    try:
        os.rename(tmp, root)
    finally:
        shutil.rmtree(old, ignore_errors=True)
