"""The background flusher: a written file's write-back starts as soon as it is added, the
final sync covers the whole filesystem, failures name the file, object stores need nothing; and
a universal checkpoint is committed only once its arrays are durable."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import ucp
from ucp import StorageError
from ucp.storage import Flusher, Storage
from ucp.storage import _flush


def test_every_added_file_is_written_back_then_the_filesystem_synced(tmp_path, monkeypatch):
    started, synced = [], []
    monkeypatch.setattr(_flush, "_start_writeback", started.append)
    monkeypatch.setattr(_flush, "_sync_filesystem", synced.append)
    storage = Storage(str(tmp_path))
    flusher = Flusher(storage)
    for i in range(5):
        storage.write(f"a/{i}", os.urandom(1000), fsync=False, atomic=False)
        flusher.add(f"a/{i}")
    flusher.finish()
    flusher.close()
    assert sorted(started) == [str(tmp_path / "a" / str(i)) for i in range(5)]
    assert synced == [str(tmp_path)]


def test_the_real_calls_run(tmp_path):
    """sync_file_range/fdatasync and syncfs/sync on a real file: no error, bytes intact."""
    storage = Storage(str(tmp_path))
    flusher = Flusher(storage)
    storage.write("f", b"x" * 100_000, fsync=False, atomic=False)
    flusher.add("f")
    flusher.finish()
    flusher.close()
    assert storage.read("f") == b"x" * 100_000


def test_a_failed_write_back_names_the_file(tmp_path, monkeypatch):
    def fail(path):
        raise OSError(errno.EIO, "Input/output error", path)
    monkeypatch.setattr(_flush, "_start_writeback", fail)
    storage = Storage(str(tmp_path))
    storage.write("bad", b"1", fsync=False)
    flusher = Flusher(storage)
    with pytest.raises(StorageError, match=r"bad: could not write to disk .*Input/output error"):
        flusher.add("bad")  # the failure shows at the next add (once the thread got to it) or at the end
        flusher.add("bad")
        flusher.finish()


def test_object_stores_need_no_flush(monkeypatch):
    monkeypatch.setattr(_flush, "_sync_filesystem", lambda path: pytest.fail("synced an object store"))
    storage = Storage("memory://flush-test")
    storage.write("f", b"1")
    flusher = Flusher(storage)
    flusher.add("f")
    flusher.finish()


def test_convert_commits_only_durable_arrays(tmp_path, monkeypatch):
    """A conversion whose final sync fails writes no commit: DST is not created."""
    ucp.save({"model": {"w": torch.randn(64, 32)}}, str(tmp_path / "n"), step=1).wait()

    def fail(path):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(_flush, "_sync_filesystem", fail)
    with pytest.raises(StorageError, match="could not flush to disk .*No space left"):
        ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)
    assert not (tmp_path / "u").exists()
    assert not list(tmp_path.glob("u.partial-*"))
