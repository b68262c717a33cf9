"""One conformance class for every storage backend (local disk, memory://, s3:// on moto)."""

from __future__ import annotations

import errno
import os
import threading
import uuid

import pytest

from ucp import ChecksumError, StorageError, UnsafeInputError, UnsupportedProtocolError
from ucp.storage import RetryPolicy, Storage, checksum, retry_call


class StorageTests:
    """Subclasses provide the ``storage`` fixture."""

    def test_write_read_round_trip(self, storage):
        payload = os.urandom(100_003)
        rec = storage.write("step-1/rank-0.bin", payload)
        assert rec.size == len(payload)
        assert rec.crc32c == checksum([payload])[0]
        assert storage.read("step-1/rank-0.bin", record=rec) == payload
        assert storage.exists("step-1/rank-0.bin")
        assert storage.size("step-1/rank-0.bin") == len(payload)

    def test_chunked_write_equals_joined(self, storage):
        chunks = [b"abc", bytearray(b"def"), memoryview(b"ghij")]
        rec = storage.write("x.bin", chunks)
        assert storage.read("x.bin", record=rec) == b"abcdefghij"
        assert rec.crc32c == checksum([b"abcdefghij"])[0]

    def test_overwrite_replaces_whole_object(self, storage):
        storage.write("f", b"first-long-content")
        storage.write("f", b"2nd")
        assert storage.read("f") == b"2nd"

    def test_read_range(self, storage):
        storage.write("r", bytes(range(100)))
        assert storage.read_range("r", 10, 20) == bytes(range(10, 20))

    def test_checksum_mismatch_names_file(self, storage):
        rec = storage.write("c.bin", b"hello world")
        bad = type(rec)(size=rec.size, crc32c=rec.crc32c ^ 1)
        with pytest.raises(ChecksumError, match="c.bin"):
            storage.read("c.bin", record=bad)
        short = type(rec)(size=rec.size + 1, crc32c=rec.crc32c)
        with pytest.raises(ChecksumError, match="size"):
            storage.read("c.bin", record=short)

    def test_list_and_delete(self, storage):
        for name in ("d/a", "d/b", "d/sub/c"):
            storage.write(name, b"1")
        assert storage.list("d") == ["a", "b", "sub"]
        assert storage.list("missing") == []
        storage.delete("d/a")
        assert storage.list("d") == ["b", "sub"]
        storage.delete("d", recursive=True)
        assert not storage.exists("d/b")
        storage.delete("d/never-there")  # missing is fine

    def test_missing_file_raises_file_not_found(self, storage):
        with pytest.raises(FileNotFoundError):
            storage.read("nope")

    @pytest.mark.parametrize("rel", ["../x", "/etc/passwd", "a/../../b", "a//b", "a\x00b", "c:x", "a\\b"])
    def test_paths_cannot_escape_root(self, storage, rel):
        with pytest.raises(UnsafeInputError):
            storage.write(rel, b"x")

    def test_parallel_map(self, storage):
        names = [f"p/{i}" for i in range(16)]
        recs = storage.map(lambda n: storage.write(n, n.encode()), names)
        assert [r.size for r in recs] == [len(n) for n in names]
        assert storage.map(lambda n: storage.read(n), names) == [n.encode() for n in names]

    def test_child_storage(self, storage):
        sub = storage.child("nested")
        sub.write("f", b"z")
        assert storage.read("nested/f") == b"z"


class TestLocalStorage(StorageTests):
    @pytest.fixture
    def storage(self, tmp_path):
        return Storage(str(tmp_path / "root"))

    def test_failed_write_leaves_previous_file_and_no_temporary(self, storage, tmp_path):
        storage.write("f", b"old")

        def chunks():
            yield b"new-part"
            raise OSError(errno.ENOSPC, "No space left on device")

        class Boom(list):
            def __iter__(self):
                return chunks()
        with pytest.raises(StorageError, match="No space"):
            storage.write("f", Boom())
        assert storage.read("f") == b"old"
        assert [n for n in os.listdir(storage.root) if "partial" in n] == []


class TestMemoryStorage(StorageTests):
    @pytest.fixture
    def storage(self):
        return Storage(f"memory://ucp-test-{uuid.uuid4().hex}")


class TestS3Storage(StorageTests):
    @pytest.fixture
    def storage(self, s3_url):
        url, opts = s3_url
        return Storage(url, storage_options=opts)


def test_unknown_protocol_names_package():
    with pytest.raises(UnsupportedProtocolError, match="gcsfs"):
        Storage("gs://bucket/x")
    with pytest.raises(UnsupportedProtocolError):
        Storage("nosuchproto://x")


def test_retry_recovers_from_transient_errors_within_bound():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"
    assert retry_call(flaky, policy=RetryPolicy(attempts=3, base_delay=0.001), what="t") == "ok"
    assert len(calls) == 3


def test_retry_gives_up_after_bound():
    calls = []

    def always():
        calls.append(1)
        raise TimeoutError("slow")
    with pytest.raises(StorageError, match="after 4 attempts"):
        retry_call(always, policy=RetryPolicy(attempts=4, base_delay=0.001), what="t")
    assert len(calls) == 4


def test_final_errors_are_not_retried():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("denied")
    with pytest.raises(StorageError):
        retry_call(denied, policy=RetryPolicy(attempts=5, base_delay=0.001), what="t")
    assert len(calls) == 1


def test_concurrent_writers_of_one_file_never_expose_a_mix(tmp_path):
    s = Storage(str(tmp_path))
    payloads = [bytes([i]) * 200_000 for i in range(4)]
    threads = [threading.Thread(target=s.write, args=("same", p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.read("same") in payloads


def test_a_non_atomic_write_replaces_a_file_another_writer_just_made(tmp_path, monkeypatch):
    """Two converting workers write the same group node: the one whose create finds the other's
    file removes it and writes its own (was: FileExistsError, the conversion failed)."""
    from ucp.storage import _store

    (tmp_path / "g").mkdir()
    real, raced = _store._remove_quietly, []

    def racing(path):
        real(path)
        if not raced:  # the other worker creates the file between our remove and our create
            raced.append(path)
            with open(path, "wb") as f:
                f.write(b"theirs")

    monkeypatch.setattr(_store, "_remove_quietly", racing)
    Storage(str(tmp_path)).write("g/zarr.json", b"ours", atomic=False, fsync=False)
    assert raced and (tmp_path / "g" / "zarr.json").read_bytes() == b"ours"
