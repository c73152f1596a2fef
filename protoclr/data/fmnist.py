"""Fashion-MNIST as a built-in data source: the four IDX files, exported once as ImageFolders of PNG files.

Nothing is downloaded unless asked (`download=True`, config `data.download=true`). The IDX files are looked for,
in this order (`find_idx_dir`): the path the user gives (`data.fmnist_src`), $PROTOCLR_FMNIST_DIR, Debian's
`dataset-fashion-mnist` package (/usr/share/datasets/fashion-mnist/), and torchvision's download layout under the
data folder ($PROTOCLR_DATA_DIR, else ~/.cache/protoclr: `FashionMNIST/raw/`). Each may be gzipped or not.

Layout: `train/<label>/<index:05d>.png` (60,000) and `test/<label>/<index:05d>.png` (10,000), label folders "0".."9"
in the official label order (0 = T-shirt/top ... 9 = Ankle boot), index = position in the IDX file, 28×28 RGB PNG
(grey replicated, pixel values unchanged), so the read → decode → augment path is the one of any user dataset.
The export is atomic and idempotent (export.py); writing the 70,000 PNG files takes ~15 s on one CPU core, once.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from . import export

log = logging.getLogger(__name__)

IMAGE_SIZE = 28
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# split -> (images file, labels file), without the optional .gz
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "PROTOCLR_FMNIST_DIR"
_VERSION = 1
_MARKER = ".protoclr_fmnist.json"
HOW_TO_GET = (
    "install Debian/Ubuntu's package (`apt-get install dataset-fashion-mnist`), or set PROTOCLR_FMNIST_DIR "
    "(or data.fmnist_src) to a folder holding train-images-idx3-ubyte.gz and the three other IDX files, or pass "
    "data.download=true to let torchvision download them"
)


def default_dir() -> Path:
    """$PROTOCLR_DATA_DIR/fmnist when that variable is set, else ~/.cache/protoclr/fmnist."""
    return export.default_dir("fmnist")


def _manifest() -> dict:
    return {"version": _VERSION, "image_size": IMAGE_SIZE, "classes": list(CLASSES)}


def is_complete(root: Path) -> bool:
    """Whether `root` holds a finished export of this version."""
    return export.is_complete(root, _MARKER, _manifest())


def _idx_path(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def _holds_idx(folder: Path) -> bool:
    return all(_idx_path(folder, name) is not None for pair in IDX_FILES.values() for name in pair)


def _in(folder: Path) -> Path | None:
    """`folder` if it holds the four files, else its torchvision layout `FashionMNIST/raw/` if that does."""
    for cand in (folder, folder / "FashionMNIST" / "raw"):
        if _holds_idx(cand):
            return cand
    return None


def find_idx_dir(path: str | os.PathLike | None = None, *, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder holding the four Fashion-MNIST IDX files (each gzipped or not), or None when there is none.

    Searched in order: `path`; $PROTOCLR_FMNIST_DIR; Debian's /usr/share/datasets/fashion-mnist/; torchvision's
    `<data_dir>/FashionMNIST/raw/`. `path` and the variable may name the folder of the files or a torchvision root
    holding `FashionMNIST/raw/`.

    Args:
        path: where the user says the files are (config `data.fmnist_src`); None or '' = search.
        data_dir: where torchvision downloads to; default `export.data_dir()` ($PROTOCLR_DATA_DIR, ~/.cache/protoclr).

    Returns:
        The folder, or None when no place of the search holds the files.

    Raises:
        FileNotFoundError: `path` or $PROTOCLR_FMNIST_DIR is given but does not hold the files (an explicit
            place is never skipped silently).
    """
    for given, what in ((path, "data.fmnist_src"), (os.environ.get(ENV_VAR), ENV_VAR)):
        if given:
            found = _in(Path(given).expanduser())
            if found is None:
                raise FileNotFoundError(
                    f"fmnist: {what}={str(given)!r} holds no Fashion-MNIST IDX files (expected "
                    f"{IDX_FILES['train'][0]}[.gz] and the three others there or in FashionMNIST/raw/ below it)"
                )
            return found
    if _holds_idx(DEBIAN_DIR):
        return DEBIAN_DIR
    raw = Path(data_dir).expanduser() if data_dir is not None else export.data_dir()
    raw = raw / "FashionMNIST" / "raw"
    return raw if _holds_idx(raw) else None


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file of unsigned bytes (gzipped when the name ends in .gz).

    Args:
        path: the file.
        ndim: the number of dimensions it must have (3 for images (N, 28, 28), 1 for labels (N,)).

    Returns:
        uint8 array of the shape in the file's header (a read-only view of the file's bytes).

    Raises:
        ValueError: the file is not such an IDX file, or is truncated or corrupt (the message names the file).
    """
    path = Path(path)
    fix = "delete it and get it again (" + HOW_TO_GET + ")"
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"fmnist: {str(path)!r} is truncated or corrupt ({e}); {fix}") from None
    magic = data[:4]
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise ValueError(
            f"fmnist: {str(path)!r} is not an IDX file of unsigned bytes with {ndim} dimension(s) (magic number "
            f"0x{magic.hex() or '(empty)'}, expected 0x0000080{ndim}); {fix}"
        )
    head = 4 + 4 * ndim
    if len(data) < head:
        raise ValueError(f"fmnist: {str(path)!r} is truncated in its header ({len(data)} bytes); {fix}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    want = int(np.prod(shape))
    if len(data) - head != want:
        raise ValueError(
            f"fmnist: {str(path)!r} is truncated or corrupt: its header says {shape} ({want} bytes of data), it holds "
            f"{len(data) - head}; {fix}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(shape)


def load_split(folder: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of split 'train' or 'test' from the IDX files in `folder`.

    Raises:
        FileNotFoundError: a file is missing. ValueError: a file is corrupt, or images and labels disagree.
    """
    folder = Path(folder)
    paths = []
    for name in IDX_FILES[split]:
        path = _idx_path(folder, name)
        if path is None:
            raise FileNotFoundError(f"fmnist: {str(folder / name)!r}[.gz] does not exist; {HOW_TO_GET}")
        paths.append(path)
    images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise ValueError(
            f"fmnist: {str(paths[0])!r} holds images of shape {images.shape} but {str(paths[1])!r} holds "
            f"{len(labels)} labels; expected (N, {IMAGE_SIZE}, {IMAGE_SIZE}) images and N labels"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"fmnist: {str(paths[1])!r} holds label {int(labels.max())}; expected 0..{len(CLASSES) - 1}")
    return images, labels


def export_fmnist(
    src: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    progress: bool = True,
) -> Path:
    """Export Fashion-MNIST as `train/` and `test/` ImageFolders (class folders 0..9, 28×28 RGB PNG files), once.

    A finished export at `cache_dir` is returned at once (no IDX file is needed then).

    Args:
        src: folder of the IDX files (or a torchvision root holding FashionMNIST/raw/); None or '' = `find_idx_dir`.
        cache_dir: folder that will hold train/ and test/; default `default_dir()`.
        download: when no IDX files are found, let torchvision download them into `<cache_dir>/../FashionMNIST/raw/`
            (the data folder by default). Nothing is downloaded when False.
        progress: a tqdm bar while the PNG files are written.

    Returns:
        The folder (`cache_dir`), holding `train/<label>/<IDX index:05d>.png` and `test/...`.

    Raises:
        FileNotFoundError: no IDX files were found and `download` is False (the message says how to get them).
        ValueError: an IDX file is truncated or corrupt (the message names it).
        OSError: the folder cannot be written.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_dir()
    if is_complete(root):
        return root
    idx_dir = find_idx_dir(src or None, data_dir=root.parent)
    if idx_dir is None:
        if not download:
            raise FileNotFoundError(f"fmnist: the Fashion-MNIST IDX files were not found; {HOW_TO_GET}")
        from torchvision.datasets import FashionMNIST

        log.info("downloading Fashion-MNIST with torchvision to %s", root.parent / "FashionMNIST")
        FashionMNIST(root=str(root.parent), train=True, download=True)
        idx_dir = root.parent / "FashionMNIST" / "raw"
    splits = {split: load_split(idx_dir, split) for split in IDX_FILES}  # all checked before anything is written
    total = sum(len(labels) for _, labels in splits.values())
    log.info("exporting Fashion-MNIST from %s to %s (%d PNG files, once)", idx_dir, root, total)

    def write(tmp: Path) -> dict:
        from PIL import Image
        from tqdm.auto import tqdm

        counts = {}
        with tqdm(total=total, desc="fmnist export", unit="img", mininterval=1.0, disable=not progress) as bar:
            for split, (images, labels) in splits.items():
                for c in range(len(CLASSES)):
                    (tmp / split / str(c)).mkdir(parents=True)
                for i, (px, y) in enumerate(zip(images, labels)):
                    rgb = np.repeat(px[:, :, None], 3, axis=2)  # (28, 28, 3) uint8: grey replicated
                    Image.fromarray(rgb).save(tmp / split / str(int(y)) / f"{i:05d}.png", format="PNG")
                    if i % 500 == 499:
                        bar.update(500)
                bar.update(len(labels) % 500)
                counts[split] = len(labels)
        counts["source"] = str(idx_dir)
        return counts

    counts = export.export_atomically(root, _MARKER, _manifest(), write)
    log.info("exported Fashion-MNIST to %s (%d train, %d test images)", root, counts["train"], counts["test"])
    return root
