"""Image datasets on disk: ImageFolder scanning, file lists, stratified subsets, and the handling of unreadable files.

A dataset is a list of `(path, class_idx)` in a fixed order; the position in that list is the *dataset index*
that the loaders return with every image (the loss's `inst`, the k-means assignment's row). The order is sorted
(classes, then paths), so it is the same on every rank and every run.

Bad data never stops training. A file that cannot be read or decoded is *skipped*: its place in the batch is taken
by another image of the same batch (`substitute`), so every rank still returns a full batch of the same size (the
distributed loss gathers equal-sized shards). The substitute keeps its own dataset index, so `inst` and the
prototype lookup stay truthful. Loaders count the skips and log one warning per epoch (`SkipLog`).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# Formats both loaders decode: DALI (nvImageCodec) and torchvision/PIL. GIF is left out: DALI cannot decode it.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm", ".tif", ".tiff", ".webp")


@dataclass
class ImageDataset:
    """Images and labels in dataset-index order.

    Attributes:
        root: the folder (or the file list's folder) the paths were found in.
        samples: `(path, class_idx)` per image; the list position is the dataset index.
        classes: class names; `class_idx` indexes this list.
    """

    root: Path
    samples: list[tuple[str, int]]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[int]:
        """Class index per image, in dataset-index order."""
        return [c for _, c in self.samples]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def read_bytes(self, index: int) -> bytes:
        """Raw file content of image `index` (raises OSError when unreadable)."""
        with open(self.samples[index][0], "rb") as f:
            return f.read()


def scan_image_folder(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> ImageDataset:
    """Index an ImageFolder (`root/<class>/**/<image>`) or a file list.

    Args:
        root: a folder with one sub-folder per class (searched recursively, symlinks followed); a folder of images
            with no class sub-folders (one class, "."); or a text file list, one `relative/path [label]` per line
            (paths relative to the list's folder, DALI's `file_list` format; label defaults to 0).
        extensions: lower-case file suffixes that count as images.

    Returns:
        ImageDataset, classes and paths sorted, so the dataset index is the same on every rank and run.

    Raises:
        FileNotFoundError: root does not exist.
        ValueError: no image was found, or a file-list line is malformed.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"scan_image_folder: data folder {str(root)!r} does not exist; pass an ImageFolder (root/<class>/<img>) "
            "or a file list, or leave --data unset for the bundled digits data"
        )
    if root.is_file():
        return read_file_list(root)
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    samples: list[tuple[str, int]] = []
    for idx, name in enumerate(classes):
        samples.extend((p, idx) for p in _walk(root / name, exts))
    if not classes:
        samples = [(p, 0) for p in _walk(root, exts)]
        if samples:
            classes = ["."]
            log.info(
                "scan_image_folder: %s has no class sub-folders; using its %d images as one class", root, len(samples)
            )
    if not samples:
        raise ValueError(
            f"scan_image_folder: no images ({', '.join(exts)}) under {str(root)!r}; expected root/<class>/<image> "
            f"(found {len(classes)} class folder(s))"
        )
    return ImageDataset(root=root, samples=samples, classes=classes)


def read_file_list(path: str | os.PathLike, root: str | os.PathLike | None = None) -> ImageDataset:
    """Dataset from a text file of `path [label]` lines (blank lines and `#` comments skipped).

    Args:
        path: the list file.
        root: folder the relative paths start from; default the list's folder.

    Raises:
        FileNotFoundError: the list does not exist.
        ValueError: the list is empty or a line is malformed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"read_file_list: file list {str(path)!r} does not exist")
    base = Path(root).expanduser() if root is not None else path.parent
    samples: list[tuple[str, int]] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, label = line.rpartition(" ")
        if not name:  # a path alone
            name, label = label, "0"
        try:
            cls = int(label)
        except ValueError:
            # The last token is part of a path with spaces, not a label.
            name, cls = line, 0
        if cls < 0:
            raise ValueError(f"read_file_list: {path}:{lineno}: label must be >= 0, got {cls}")
        samples.append((str(base / name.strip()), cls))
    if not samples:
        raise ValueError(f"read_file_list: file list {str(path)!r} holds no images")
    n_classes = max(c for _, c in samples) + 1
    return ImageDataset(root=base, samples=samples, classes=[str(i) for i in range(n_classes)])


def stratified_subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset:
    """A class-stratified random subset of `n` images of `ds`, the same for the same `seed` (config data.subset).

    Class c keeps n * |c| / len(ds) images (rounded down, then the largest remainders get one more: ties to the lower
    class index), drawn uniformly without replacement. The subset keeps `ds`'s order (so its dataset indices are
    0..n-1 in path order) and its class list.

    Args:
        ds: the dataset.
        n: images to keep, 1..len(ds); len(ds) returns `ds` itself.
        seed: fixes the draw (config `seed`).

    Raises:
        ValueError: n is not in 1..len(ds).
    """
    if not 0 < n <= len(ds):
        raise ValueError(
            f"stratified_subset: data.subset={n} must be in 1..{len(ds)} (the training images in {ds.root})"
        )
    if n == len(ds):
        return ds
    targets = np.asarray(ds.targets, dtype=np.int64)
    sizes = np.bincount(targets, minlength=len(ds.classes))
    quota, rem = np.divmod(n * sizes, len(ds))  # exact integer shares
    quota[np.argsort(-rem, kind="stable")[: n - int(quota.sum())]] += 1
    rng = np.random.default_rng([seed, 0x5B5E7])
    keep = [rng.permutation(np.flatnonzero(targets == c))[:q] for c, q in enumerate(quota)]
    return ImageDataset(ds.root, [ds.samples[i] for i in np.sort(np.concatenate(keep))], list(ds.classes))


def _walk(folder: Path, exts: tuple[str, ...]) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(exts))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Unreadable files
# ---------------------------------------------------------------------------------------------------------------------


def check_encoded(data: bytes) -> str | None:
    """Cheap test of an encoded image, before a decoder sees it; None = looks fine, else the reason.

    A DALI decode error invalidates the whole pipeline, so the DALI loader screens files first: an empty file, an
    unknown or broken header, and a truncated JPEG or PNG (the common ways a copy goes wrong) are caught here for
    the price of a header parse. Damage inside the compressed stream is caught later by the decoder itself.
    """
    if len(data) == 0:
        return "empty file"
    if data[:3] == b"\xff\xd8\xff":
        # The entropy-coded scan cannot contain FF D9 (FF is byte-stuffed), so a complete file has an EOI marker
        # after its last start-of-scan; thumbnails in EXIF come before the main scan and do not fool this.
        sos = data.rfind(b"\xff\xda")
        if sos < 0 or data.rfind(b"\xff\xd9") < sos:
            return "truncated JPEG (no end-of-image marker after the last scan)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in data[-64:]:
            return "truncated PNG (no IEND chunk)"
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            if im.width < 1 or im.height < 1:
                return f"empty image ({im.width}x{im.height})"
    except Exception as e:  # PIL raises many types for bad headers
        return f"unrecognised image header ({type(e).__name__}: {e})"
    return None


def substitute(bad: Sequence[int], n: int) -> dict[int, int]:
    """Replacement positions for the bad positions of a batch of n: the next good position, cyclically.

    Returns {bad position: good position}, empty when every position is bad (the caller then falls back to
    `find_good_index`). Taking a partner from the same batch keeps the batch full and every rank's batch the same
    size, adds no image that another rank may hold, and keeps `inst` truthful (two copies of one image are two
    views of one image).
    """
    bad_set = set(bad)
    if not bad_set:
        return {}
    if len(bad_set) >= n:
        return {}
    out = {}
    for p in sorted(bad_set):
        q = (p + 1) % n
        while q in bad_set:
            q = (q + 1) % n
        out[p] = q
    return out


def find_good_index(start: int, n: int, is_good: Callable[[int], bool], limit: int = 1000) -> int:
    """First dataset index at or after `start` (cyclically) for which `is_good` holds; used only when a whole batch
    is unreadable. Raises RuntimeError after `limit` bad candidates (the data are broken beyond skipping)."""
    for k in range(min(limit, n)):
        i = (start + k) % n
        if is_good(i):
            return i
    raise RuntimeError(f"no readable image among {min(limit, n)} dataset entries from index {start}; check the data")


class SkipLog:
    """Counts skipped files of the current epoch (or evaluation pass), keeps their paths, and reports them in one
    warning at its end."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.examples: list[str] = []
        self.paths: list[str] = []

    def reset(self) -> None:
        self.count = 0
        self.examples = []
        self.paths = []

    def add(self, path: str, reason: str) -> None:
        self.count += 1
        self.paths.append(path)
        if len(self.examples) < 5:
            self.examples.append(f"{path} ({reason})")

    def report(self, epoch: int | None) -> None:
        """One warning for the epoch (None: an evaluation pass, where bad images become blank rows)."""
        if not self.count:
            return
        if epoch is None:
            what, fix = "in this pass", "each given as a blank (all-zero) image (k-means keeps it, kNN/linear drop it)"
        else:
            what, fix = f"in epoch {epoch}", "each replaced by another image of its batch"
        log.warning(
            "%s: skipped %d unreadable image(s) %s, %s; e.g. %s",
            self.what,
            self.count,
            what,
            fix,
            "; ".join(self.examples),
        )
