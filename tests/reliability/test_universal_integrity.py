"""Reading a universal checkpoint: damaged array metadata, missing chunks and hostile tables are
errors that name the file; none reads silently as zeros or as another shape."""

from __future__ import annotations

import json
import resource

import pytest
import torch

import ucp
from ucp._meta import seal


@pytest.fixture
def universal(tmp_path):
    state = {"model": {"w": torch.randn(64, 8), "z": torch.zeros(300, 300)},
             "optim": {"state": {"w": {"exp_avg": torch.zeros(64, 8)}}, "param_groups": [{"params": ["w"]}]}}
    ucp.save(state, str(tmp_path / "n"), step=1).wait()
    ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)
    return tmp_path / "u", state


def _edit_json(path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _edit_table(u, fn) -> None:
    def edit(doc):
        attrs = doc["attributes"]["ucp"]
        fn(attrs)
        doc["attributes"]["ucp"] = seal(attrs)  # a consistent (hostile) table, not a bit flip
    _edit_json(u / "zarr.json", edit)


def test_all_zero_arrays_read_back(universal):
    u, state = universal
    ckpt = ucp.open(str(u))
    assert torch.equal(ckpt.read("z"), state["model"]["z"])
    assert torch.equal(ckpt.read("w", "exp_avg"), torch.zeros(64, 8))


def test_missing_chunk_is_named_not_read_as_zeros(universal):
    u, _ = universal
    chunk = sorted((u / "params" / "z" / "fp32" / "c").rglob("*"))[-1]
    chunk.unlink()
    with pytest.raises(ucp.CorruptCheckpointError, match=f"{chunk.relative_to(u)}: chunk file missing"):
        ucp.open(str(u)).read("z")


def test_bit_flip_in_a_chunk_names_the_chunk(universal):
    u, _ = universal
    chunk = sorted(p for p in (u / "params" / "z" / "fp32" / "c").rglob("*") if p.is_file())[1]
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ucp.ChecksumError, match=f"{chunk.relative_to(u)}: CRC32C does not match"):
        ucp.open(str(u)).read("z")


@pytest.mark.parametrize("edit", [
    lambda m: m.update(shape=[65, 8]),  # one digit flipped: 64 -> 65
    lambda m: m["chunk_key_encoding"]["configuration"].update(separator="."),  # chunks "not found"
    lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[0, 8]),
    lambda m: m["chunk_grid"]["configuration"].update(chunk_shape="64"),
    lambda m: m.update(data_type="float64"),
    lambda m: m["attributes"].update(ucp_dtype="bfloat16"),
], ids=["shape", "separator", "zero-chunk", "chunk-type", "dtype", "logical-dtype"])
def test_damaged_array_metadata_is_named(universal, edit):
    u, _ = universal
    _edit_json(u / "params" / "w" / "fp32" / "zarr.json", edit)
    with pytest.raises(ucp.UcpError, match=r"params/w/fp32"):
        ucp.open(str(u)).read("w")


@pytest.mark.parametrize("path", ["../outside", "/etc", "params/../../x", "a\x00b"])
def test_table_path_cannot_leave_the_root(universal, path):
    u, _ = universal
    _edit_table(u, lambda a: a["params"]["w"].update(path=path))
    with pytest.raises(ucp.UnsafeInputError):
        ucp.open(str(u))


@pytest.mark.parametrize("entry", [{"path": "params/w"}, [1, 2], {"path": "params/w", "shape": [-1],
                                   "dtype": "float32", "states": ["fp32"]},
                                   {"path": "params/w", "shape": [64, 8], "dtype": "complex", "states": ["fp32"]},
                                   {"path": "params/w", "shape": [64, 8], "dtype": "float32", "states": ["../x"]}])
def test_malformed_table_entries(universal, entry):
    u, _ = universal
    _edit_table(u, lambda a: a["params"].update(w=entry))
    with pytest.raises(ucp.CorruptCheckpointError, match="zarr.json"):
        ucp.open(str(u))


@pytest.mark.parametrize("rows,chunk", [(2**27, 64), (2**40, 2**20)])
def test_huge_declared_shape_is_refused_with_bounded_memory(universal, rows, chunk):
    """Consistent table and array metadata that claim a 4 GiB / 32 TiB array in a tiny file."""
    u, _ = universal
    _edit_table(u, lambda a: a["params"]["w"].update(shape=[rows, 8]))
    _edit_json(u / "params" / "w" / "fp32" / "zarr.json", lambda m: (
        m.update(shape=[rows, 8]), m["chunk_grid"]["configuration"].update(chunk_shape=[chunk, 8])))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ckpt = ucp.open(str(u))
    assert ckpt.info("w").shape == (rows, 8)
    with pytest.raises(ucp.CorruptCheckpointError, match=r"params/w/fp32"):
        ckpt.read("w")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024 < 256
