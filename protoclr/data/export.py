"""What the built-in data sources share (digits.py, fmnist.py): the cache folder and the atomic, idempotent export.

An export writes its files into a temporary sibling folder, writes a marker file (a JSON manifest plus counts) last,
and renames the folder into place. A crash or a concurrent export therefore never leaves half a dataset, an
incomplete or outdated folder is replaced, and a second call finds the marker and writes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def data_dir() -> Path:
    """$PROTOCLR_DATA_DIR when that variable is set, else ~/.cache/protoclr: the parent of every export."""
    base = os.environ.get("PROTOCLR_DATA_DIR")
    if base:
        return Path(base).expanduser()
    return Path.home() / ".cache" / "protoclr"


def default_dir(name: str) -> Path:
    """`data_dir() / name`: where the built-in data source `name` is exported by default."""
    return data_dir() / name


def is_complete(root: Path, marker: str, manifest: dict) -> bool:
    """Whether `root` holds a finished export whose marker file agrees with `manifest` on every key of it."""
    try:
        meta = json.loads((Path(root) / marker).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in manifest.items())


def export_atomically(root: Path, marker: str, manifest: dict, write: Callable[[Path], dict]) -> dict:
    """Run `write(tmp)` in a temporary sibling of `root`, add the marker, and move the result into place.

    Args:
        root: the final folder.
        marker: file name of the marker, written last into the folder.
        manifest: what `is_complete` compares (version, sizes, ...).
        write: fills the folder it is given; returns counts (JSON types) stored in the marker next to `manifest`.

    Returns:
        The counts `write` returned.

    Raises:
        OSError: the folder cannot be written. Nothing is left behind on any error.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(p.name for p in root.parent.glob(f".{root.name}.tmp-*"))
    if leftovers:
        log.warning(
            "%s holds %s from an export that was interrupted (or is running now); delete it when no export runs",
            root.parent,
            ", ".join(leftovers),
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should be as readable as any folder
    try:
        counts = write(tmp)
        (tmp / marker).write_text(json.dumps({**manifest, **counts}))
        _install(tmp, root, lambda: is_complete(root, marker, manifest))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return counts


def _install(tmp: Path, root: Path, complete: Callable[[], bool]) -> None:
    """Move the finished export into place; an incomplete or outdated folder there is replaced, a complete one
    written meanwhile by another process is kept."""
    try:
        os.rename(tmp, root)
        return
    except OSError:
        if complete():  # another process finished first
            return
    # `root` exists but is incomplete or outdated: swap it out, then remove it.
    old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
    os.rename(root, old / "stale")
    try:
        os.rename(tmp, root)
    finally:
        shutil.rmtree(old, ignore_errors=True)
