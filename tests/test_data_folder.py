"""Dataset scanning, file lists, the encoded-image screen and in-batch substitution (protoclr.data.folder)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from protoclr.data import read_file_list, scan_image_folder
from protoclr.data.folder import check_encoded, find_good_index, substitute


def _encode(fmt: str, size: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_scan_image_folder_sorted_classes_and_paths(tmp_path):
    for cls, names in {"b": ["z.png", "a.jpg"], "a": ["m.png"], "c": ["sub/x.png", "notes.txt"]}.items():
        for name in names:
            p = tmp_path / cls / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    (tmp_path / ".hidden").mkdir()
    ds = scan_image_folder(tmp_path)
    assert ds.classes == ["a", "b", "c"]
    rel = [(str(p).replace(str(tmp_path) + "/", ""), c) for p, c in ds.samples]
    assert rel == [("a/m.png", 0), ("b/a.jpg", 1), ("b/z.png", 1), ("c/sub/x.png", 2)]
    assert len(ds) == 4 and ds.targets == [0, 1, 1, 2]


def test_scan_flat_folder_is_one_class(tmp_path):
    for n in ("1.png", "2.png"):
        (tmp_path / n).write_bytes(b"x")
    ds = scan_image_folder(tmp_path)
    assert len(ds) == 2 and ds.classes == ["."] and ds.targets == [0, 0]


def test_scan_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path)


def test_file_list(tmp_path):
    (tmp_path / "list.txt").write_text("# comment\nimgs/a.jpg 3\n\nimgs/b c.png\nimgs/d.png 0\n")
    ds = scan_image_folder(tmp_path / "list.txt")
    assert [c for _, c in ds.samples] == [3, 0, 0]
    assert ds.samples[0][0] == str(tmp_path / "imgs" / "a.jpg")
    assert ds.samples[1][0] == str(tmp_path / "imgs" / "b c.png")
    assert len(ds.classes) == 4
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="holds no images"):
        read_file_list(tmp_path / "empty.txt")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "WEBP"])
def test_check_encoded_accepts_valid(fmt):
    assert check_encoded(_encode(fmt)) is None


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: b"", "empty"),
        (lambda: b"not an image at all" * 10, "header"),
        (lambda: _encode("JPEG")[:-200], "truncated JPEG"),
        (lambda: _encode("JPEG")[:-2], "truncated JPEG"),
        (lambda: _encode("PNG")[:-100], "truncated PNG"),
        (lambda: _encode("PNG")[:40], "truncated PNG"),
        (lambda: _encode("JPEG")[:30], "truncated JPEG"),
    ],
)
def test_check_encoded_rejects_bad(make, reason):
    why = check_encoded(make())
    assert why is not None and reason in why


def test_check_encoded_jpeg_trailing_bytes_ok():
    # Some cameras append data after the EOI marker; such files decode fine and must not be rejected.
    assert check_encoded(_encode("JPEG") + b"\x00" * 16) is None


def test_substitute():
    assert substitute([], 4) == {}
    assert substitute([1], 4) == {1: 2}
    assert substitute([3], 4) == {3: 0}
    assert substitute([1, 2], 4) == {1: 3, 2: 3}
    assert substitute([0, 1, 2, 3], 4) == {}  # all bad: caller falls back to find_good_index


def test_find_good_index():
    assert find_good_index(5, 8, lambda i: i in (1, 7)) == 7
    assert find_good_index(8 - 1, 8, lambda i: i == 1) == 1  # wraps around
    with pytest.raises(RuntimeError, match="no readable image"):
        find_good_index(0, 8, lambda i: False)
