"""Reading universal arrays chunk by chunk: ZeRO-3 partitions, missing and damaged chunks, and
arrays in another zarr layout (read through zarr instead)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ucp
from crc32c import crc32c

from ucp.native._meta import seal
from ucp.resharder import load_rank_state


@pytest.fixture
def universal(tmp_path):
    """w: 1024 x 512 with an all-zero first half; b: bf16."""
    w = torch.randn(1024, 512)
    w[:512] = 0
    b = torch.randn(300, 7).bfloat16()
    ucp.save({"model": {"w": w, "b": b}}, str(tmp_path / "n"), step=3).wait()
    ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"))
    return tmp_path / "u", {"w": w, "b": b}


def test_flat_partitions_of_real_chunks(universal):
    root, want = universal
    for rank in range(4):
        got = load_rank_state(str(root), "dp=4,zero=3", rank)["model"]
        for name, t in want.items():
            flat = t.reshape(-1)
            part = -(-flat.numel() // 4)
            ref = torch.cat([flat, flat.new_zeros(4 * part - flat.numel())])[rank * part:(rank + 1) * part]
            assert torch.equal(got[name].view(torch.uint8), ref.view(torch.uint8)), (name, rank)


def test_a_missing_chunk_is_lost_data(universal):
    """ucp writes every chunk (zeros too), so a missing one (here a whole shard file) is an
    error, never zeros."""
    root, _ = universal
    chunk = root / "params" / "w" / "fp32" / "c.0.0"
    chunk.unlink()
    with pytest.raises(ucp.CorruptCheckpointError, match="missing") as e:
        load_rank_state(str(root), "dp=2,zero=1", 0)
    assert "params/w/fp32/c.0.0" in str(e.value)


def test_a_flipped_bit_names_the_chunk(universal):
    root, _ = universal
    chunk = next((root / "params" / "w" / "fp32").glob("c.*"))
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0x01
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ucp.ChecksumError, match="CRC32C") as e:
        load_rank_state(str(root), "dp=1", 0)
    assert str(chunk.relative_to(root)) in str(e.value)


def test_other_zarr_layouts_are_read_through_zarr(universal):
    """An array rewritten with a compressor (not ucp's raw layout) reads the same."""
    import zarr
    from zarr.codecs import GzipCodec

    root, want = universal
    store = zarr.storage.LocalStore(str(root))
    old = zarr.open_array(store, path="params/w/fp32", mode="r")
    data, attrs = old[...], dict(old.attrs)
    new = zarr.create_array(store, name="params/w/fp32", shape=data.shape, dtype=data.dtype,
                            chunks=(100, 100), compressors=[GzipCodec()], attributes=attrs,
                            overwrite=True, config={"write_empty_chunks": True})
    new[...] = data
    meta = root / "params" / "w" / "fp32" / "zarr.json"
    doc = json.loads((root / "zarr.json").read_text())  # record the new metadata's CRC32C
    doc["attributes"]["ucp"]["params"]["w"]["meta_crc32c"]["fp32"] = crc32c(meta.read_bytes())
    doc["attributes"]["ucp"] = seal(doc["attributes"]["ucp"])
    (root / "zarr.json").write_text(json.dumps(doc))
    assert json.loads((root / "params" / "w" / "fp32" / "zarr.json").read_text())["codecs"][-1]["name"] == "gzip"
    got = load_rank_state(str(root), "dp=2,zero=1", 1)
    assert torch.equal(got["model"]["w"], want["w"])
    assert np.array_equal(got["model"]["b"].view(torch.int16).numpy(), want["b"].view(torch.int16).numpy())
