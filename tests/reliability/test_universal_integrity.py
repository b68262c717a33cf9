"""Reading a universal checkpoint: damaged array metadata, missing chunks and hostile tables are
errors that name the file; none reads silently as zeros or as another shape."""

from __future__ import annotations

import json
import resource

import pytest
import torch

import ucp
from ucp.resharder import load_rank_state
from ucp.native._meta import seal
from crc32c import crc32c


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


def _edit_array(u, name, state, fn, *, consistent=True) -> None:
    """Edits an array's zarr.json; ``consistent``: also records its new CRC32C in the (sealed)
    table, as a hostile writer would, so the readers' own checks are what is tested."""
    path = u / "params" / name / state / "zarr.json"
    _edit_json(path, fn)
    if consistent:
        _edit_table(u, lambda a: a["params"][name]["meta_crc32c"].update({state: crc32c(path.read_bytes())}))


def test_all_zero_arrays_read_back(universal):
    u, state = universal
    ckpt = ucp.open(str(u))
    assert torch.equal(ckpt.read("z"), state["model"]["z"])
    assert torch.equal(ckpt.read("w", "exp_avg"), torch.zeros(64, 8))


def test_missing_chunk_is_named_not_read_as_zeros(universal):
    u, _ = universal
    chunk = sorted((u / "params" / "z" / "fp32").glob("c.*"))[-1]
    chunk.unlink()
    with pytest.raises(ucp.CorruptCheckpointError, match=f"{chunk.relative_to(u)}: chunk file missing"):
        ucp.open(str(u)).read("z")


def test_bit_flip_in_a_chunk_names_the_chunk(universal):
    u, _ = universal
    chunk = sorted((u / "params" / "z" / "fp32").glob("c.*"))[0]
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0x10
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ucp.ChecksumError, match=f"{chunk.relative_to(u)}: CRC32C does not match"):
        ucp.open(str(u)).read("z")


_PLAIN = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


@pytest.mark.parametrize("consistent", [False, True], ids=["flipped", "consistent"])
@pytest.mark.parametrize("edit", [
    lambda m: m.update(shape=[65, 8]),  # one digit flipped: 64 -> 65
    lambda m: m["chunk_key_encoding"]["configuration"].update(separator="/"),  # chunks "not found"
    lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[0, 8]),
    lambda m: m["chunk_grid"]["configuration"].update(chunk_shape="64"),
    lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[32, 8]),  # inner chunks
    lambda m: m["codecs"][0]["configuration"].update(chunk_shape=[48, 8]),  # not a divisor
    lambda m: m.update(codecs=_PLAIN),  # the shard read as one plain chunk
    lambda m: m.update(data_type="float64"),
    lambda m: m["attributes"].update(ucp_dtype="bfloat16"),
], ids=["shape", "separator", "zero-chunk", "chunk-type", "inner", "inner-odd", "unsharded", "dtype",
        "logical-dtype"])
def test_damaged_array_metadata_is_named(universal, edit, consistent):
    u, _ = universal
    _edit_array(u, "w", "fp32", edit, consistent=consistent)
    with pytest.raises(ucp.UcpError, match=r"params/w/fp32"):
        ucp.open(str(u)).read("w")
    with pytest.raises(ucp.UcpError, match=r"params/w/fp32"):
        load_rank_state(str(u), "dp=2,zero=1", 1)


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
    _edit_array(u, "w", "fp32", lambda m: (
        m.update(shape=[rows, 8], codecs=_PLAIN), m["chunk_grid"]["configuration"].update(chunk_shape=[chunk, 8])))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ckpt = ucp.open(str(u))
    assert ckpt.info("w").shape == (rows, 8)
    with pytest.raises(ucp.CorruptCheckpointError, match=r"params/w/fp32"):
        ckpt.read("w")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024 < 256
