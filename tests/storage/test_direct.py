"""Direct writes (``O_DIRECT`` in aligned blocks, ``ucp.storage._direct``): the same bytes and
CRC32C as a buffered write at every size around the block and page boundaries, written around
the page cache where the filesystem allows it, through it where it refuses (at open or at the
write), failures surfaced with no partial file left; and the universal writer's large shards,
written this way, read back bit for bit by ucp and by zarr."""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np
import pytest
import torch
import zarr
from crc32c import crc32c

import ucp
from ucp import StorageError
from ucp.storage import Storage
from ucp.storage import _direct, _store
from ucp.universal import _checkpoint

BLOCK, PAGE = _direct.BLOCK, _direct.ALIGN
SIZES = [0, 1, PAGE - 1, PAGE, PAGE + 1, BLOCK - 3, BLOCK, BLOCK + 5, 3 * BLOCK + PAGE + 17]


def _pieces(data: bytes, seed: int) -> list[memoryview]:
    """``data`` cut at random places (pieces of 0 bytes to a block and a half)."""
    rng, out, view = np.random.default_rng(seed), [], memoryview(data)
    while view:
        n = int(rng.integers(0, BLOCK * 3 // 2))
        out.append(view[:n])
        view = view[n:]
    return out


def _direct_supported(path) -> bool:
    try:
        fd = os.open(str(path / "probe"), os.O_WRONLY | os.O_CREAT | _direct.DIRECT_FLAG, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.remove(path / "probe")
    return bool(_direct.DIRECT_FLAG)


@pytest.mark.parametrize("size", SIZES)
def test_same_bytes_and_crc_as_a_buffered_write(tmp_path, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    storage = Storage(str(tmp_path))
    rec = storage.write("d", _pieces(data, size), direct=True, atomic=False, fsync=False)
    plain = storage.write("p", data)
    assert (tmp_path / "d").read_bytes() == data
    assert rec.size == plain.size == size and rec.crc32c == plain.crc32c == crc32c(data)
    assert storage.write("n", [data], direct=True, crc=False).crc32c == 0  # atomic and fsync'd, no CRC
    assert (tmp_path / "n").read_bytes() == data


def test_writes_go_around_the_page_cache_where_the_filesystem_allows(tmp_path, monkeypatch):
    flags = []
    real = _direct._write_all
    monkeypatch.setattr(_direct, "_write_all",
                        lambda f, view: (flags.append(fcntl.fcntl(f.fileno(), fcntl.F_GETFL)), real(f, view)))
    data = os.urandom(2 * BLOCK + 100)
    Storage(str(tmp_path)).write("d", data, direct=True, atomic=False, fsync=False)
    assert len(flags) == 3  # two full blocks, then the padded tail
    direct = [bool(f & _direct.DIRECT_FLAG) for f in flags]
    assert direct == [_direct_supported(tmp_path)] * 3
    assert (tmp_path / "d").read_bytes() == data


def test_a_filesystem_refusing_o_direct_at_open_gets_a_buffered_write(tmp_path, monkeypatch):
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & _direct.DIRECT_FLAG:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)
    monkeypatch.setattr(_direct.os, "open", no_direct)
    data = os.urandom(BLOCK + 3)
    rec = Storage(str(tmp_path)).write("d", data, direct=True)
    assert (tmp_path / "d").read_bytes() == data and rec.crc32c == crc32c(data)


class _Picky:
    """A file whose filesystem refuses direct writes (EINVAL), recording each attempt."""

    def __init__(self, f, seen):
        self.f, self.seen = f, seen

    def fileno(self):
        return self.f.fileno()

    def write(self, view):
        direct = bool(fcntl.fcntl(self.f.fileno(), fcntl.F_GETFL) & _direct.DIRECT_FLAG)
        self.seen.append(direct)
        if direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return self.f.write(view)


def test_a_filesystem_refusing_the_direct_write_gets_the_rest_buffered(tmp_path, monkeypatch):
    seen = []
    real = _direct.write_blocks
    monkeypatch.setattr(_store, "write_blocks", lambda f, chunks, crc: real(_Picky(f, seen), chunks, crc=crc))
    data = os.urandom(3 * BLOCK + 1)
    Storage(str(tmp_path)).write("d", data, direct=True, atomic=False, fsync=False)
    assert (tmp_path / "d").read_bytes() == data
    assert seen.count(True) <= 1 and seen[-1] is False  # refused once at most, then buffered


def test_a_full_disk_surfaces_and_leaves_no_file(tmp_path):
    from ucp.testing_faults import disk_full

    storage = Storage(str(tmp_path))
    with disk_full(tmp_path, free_bytes=BLOCK + 1000), \
            pytest.raises((StorageError, OSError), match="No space left"):
        storage.write("d", [os.urandom(BLOCK)] * 4, direct=True, atomic=False, fsync=False)
    assert not (tmp_path / "d").exists()
    data = os.urandom(2 * BLOCK + 9)  # the blocks are reusable afterwards
    storage.write("d", data, direct=True, atomic=False, fsync=False)
    assert (tmp_path / "d").read_bytes() == data
    data = os.urandom(2 * BLOCK + 9)
    storage.write("d", data, direct=True, atomic=False, fsync=False)
    assert (tmp_path / "d").read_bytes() == data


def test_large_shards_are_written_direct_and_read_back_by_ucp_and_zarr(tmp_path, monkeypatch):
    written = []
    real = Storage.write

    def spy(self, rel, data, **kw):
        written.append((rel, kw.get("direct", False)))
        return real(self, rel, data, **kw)
    monkeypatch.setattr(Storage, "write", spy)
    g = torch.Generator().manual_seed(1)
    state = {"big": torch.randn(1531, 1027, generator=g).bfloat16(),  # ~3 MiB, ragged edges
             "wide": torch.randn(3, 333_333, generator=g), "small": torch.randn(7, 5, generator=g)}
    ucp.save({"model": state}, str(tmp_path / "n"), step=1).wait()
    ckpt = ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)
    shards = {rel: d for rel, d in written if "/c." in rel}
    assert {rel.split("/")[1] for rel, d in shards.items() if d} == {"big", "wide"}
    assert not any(d for rel, d in shards.items() if "/small/" in rel)  # a small shard: buffered
    for name, t in state.items():
        got = ckpt.read(name, "param")
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8) if t.dtype == torch.bfloat16 else got,
                                                    t.view(torch.uint8) if t.dtype == torch.bfloat16 else t)
        stored = "param" if t.dtype == torch.bfloat16 else "fp32"
        arr = zarr.open_array(str(tmp_path / "u" / "params" / name / stored), mode="r")
        want = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert np.array_equal(arr[...].view(want.dtype), want), name
    assert _checkpoint.DIRECT_BYTES <= 3 << 20


def test_reshard_and_export_write_their_data_files_direct(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ucp.ops._export import export_hf
    from ucp.ops._reshard import reshard

    flags: list[tuple[int, int]] = []
    real = _direct._write_all
    monkeypatch.setattr(_direct, "_write_all", lambda f, view: (
        flags.append((len(view), fcntl.fcntl(f.fileno(), fcntl.F_GETFL))), real(f, view)))
    g = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(1024, 1500, generator=g), "b": torch.randn(1500, generator=g)}
    ucp.save({"model": state}, str(tmp_path / "n"), step=1).wait()
    ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)
    want = _direct_supported(tmp_path)

    flags.clear()
    reshard(str(tmp_path / "u"), str(tmp_path / "r"), topology="dp=2,zero=1", progress=False)
    assert sum(n for n, _ in flags) >= 2 * 1024 * 1500 * 4  # each rank's data file went this way
    assert all(bool(f & _direct.DIRECT_FLAG) == want for _, f in flags)
    for rank in range(2):
        got = ucp.resharder.load_rank_state(str(tmp_path / "r"), "dp=2,zero=1", rank)["model"]
        assert torch.equal(got["w"], state["w"]) and torch.equal(got["b"], state["b"])

    flags.clear()
    export_hf(str(tmp_path / "u"), str(tmp_path / "hf"), progress=False)
    assert sum(n for n, _ in flags) >= 1024 * 1500 * 4
    assert all(bool(f & _direct.DIRECT_FLAG) == want for _, f in flags)
    out = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
