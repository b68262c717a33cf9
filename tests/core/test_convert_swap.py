"""``ucp convert`` builds beside its destination: a hard-linked snapshot of an old output never
changes, ``--overwrite`` keeps the old output until the new one is complete, and a failed
conversion leaves nothing behind."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess

import pytest
import torch

import ucp
from ucp.universal._checkpoint import UniversalWriter
from ucp.ops._verify import verify_checkpoint


def _native(root, value: float) -> str:
    ucp.save({"model": {"w": torch.full((64, 8), value), "b": torch.full((8,), value)}}, root, step=1).wait()
    return str(root)


def _digests(root) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(root) for f in fs}


def test_overwrite_never_changes_a_hard_linked_snapshot(tmp_path):
    dst, snap = tmp_path / "universal", tmp_path / "snapshot"
    ucp.convert(_native(tmp_path / "a", 1.0), str(dst))
    subprocess.run(["cp", "-al", str(dst), str(snap)], check=True)
    before = _digests(snap)
    ucp.convert(_native(tmp_path / "b", 2.0), str(dst), overwrite=True)
    assert _digests(snap) == before
    assert torch.equal(ucp.open(str(snap)).read("w", "param"), torch.full((64, 8), 1.0))
    assert verify_checkpoint(str(snap)).ok
    assert torch.equal(ucp.open(str(dst)).read("w", "param"), torch.full((64, 8), 2.0))


def test_overwrite_keeps_the_old_output_when_the_new_one_does_not_fit(tmp_path, monkeypatch):
    dst = tmp_path / "universal"
    ucp.convert(_native(tmp_path / "a", 1.0), str(dst))
    real, calls = UniversalWriter.write_later, []

    def disk_full(self, path, tensor, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, tensor, **kwargs)
    monkeypatch.setattr(UniversalWriter, "write_later", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ucp.convert(_native(tmp_path / "b", 2.0), str(dst), overwrite=True)
    assert torch.equal(ucp.open(str(dst)).read("w", "param"), torch.full((64, 8), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "universal"]  # no partial build left


def test_convert_refuses_a_directory_of_other_files(tmp_path):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(ucp.CheckpointExistsError, match="notes.txt.*new or empty directory"):
        ucp.convert(_native(tmp_path / "a", 1.0), str(dst))
    assert (dst / "notes.txt").read_text() == "keep me"


def test_publish_syncs_the_parent_directory_after_the_rename(tmp_path, monkeypatch):
    import ucp.ops._beside as beside

    synced = []
    monkeypatch.setattr(beside, "fsync_dir", lambda d: synced.append((d, os.path.isdir(tmp_path / "universal"))))
    ucp.convert(_native(tmp_path / "a", 1.0), str(tmp_path / "universal"))
    # the parent is synced once the output has its final name (a power cut keeps the rename)
    assert synced == [(str(tmp_path), True)]
