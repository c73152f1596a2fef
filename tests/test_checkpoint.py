"""protoclr.checkpoint: the file it writes (mode, temporaries) and the files it refuses to read.
(Atomic save, unwrap and strict model loads are in test_trainer.py; resume end to end in test_e2e.py.)"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from protoclr import checkpoint

STATE = {"model": {"w": torch.ones(2)}, "config": {}, "epoch": 1, "step": 7}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = checkpoint.save(tmp_path / "checkpoint.pth", STATE)  # tempfile.mkstemp's 0600 before
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, oct(path.stat().st_mode)
        text = checkpoint.atomic_write(tmp_path / "config.yaml", lambda f: f.write(b"a: 1\n"))
        assert stat.S_IMODE(text.stat().st_mode) == 0o666 & ~umask, oct(text.stat().st_mode)
    finally:
        os.umask(old)
    assert text.read_text() == "a: 1\n" and checkpoint.load(path)["step"] == 7


def test_stale_temporaries_are_removed(tmp_path):
    """A writer killed mid-save leaves `.NAME.<random>.tmp`: the next save of NAME removes those of NAME, and
    `remove_stale_temporaries` (the trainer calls it at start) those of every checkpoint name; nothing else."""
    stale_latest = tmp_path / ".checkpoint.pth.0badc0de.tmp"
    stale_numbered = tmp_path / ".checkpoint0004.pth.deadbeef.tmp"
    others = [tmp_path / ".config.yaml.12345678.tmp", tmp_path / "notes.tmp", tmp_path / ".checkpoint.pth.keep"]
    for p in [stale_latest, stale_numbered, *others]:
        p.write_bytes(b"half a checkpoint")
    checkpoint.save(tmp_path / "checkpoint.pth", STATE)
    assert not stale_latest.exists() and stale_numbered.exists()
    assert checkpoint.remove_stale_temporaries(tmp_path) == 1
    assert not stale_numbered.exists()
    assert all(p.exists() for p in others)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pth", *(p.name for p in others)])


def test_load_refuses_what_is_not_a_checkpoint(tmp_path):
    good = checkpoint.save(tmp_path / "run" / "checkpoint.pth", STATE)
    with pytest.raises(IsADirectoryError, match=f"pass its latest checkpoint file, '{good}'"):
        checkpoint.load(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.pth")
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:100])
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("hello")
    for name in ("truncated.pth", "empty.pth", "text.pth"):
        with pytest.raises(ValueError, match="cannot be read: truncated .* or not a checkpoint written by train.py"):
            checkpoint.load(tmp_path / name)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    for name in ("other.pth", "tensor.pth"):
        with pytest.raises(ValueError, match=r"not a protoclr checkpoint .* lacks \['model', 'config', 'epoch'"):
            checkpoint.load(tmp_path / name)
    assert checkpoint.load(tmp_path / "other.pth", keys=["state_dict"]) == {"state_dict": {}}
