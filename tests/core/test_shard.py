"""The universal arrays' shard files (zarr v3 sharding): few files, readable by zarr itself,
read by region through ucp's own readers, and every damage to a shard named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import ucp
import ucp.universal._shard as shard
from ucp.universal._shard import ShardParts, layout_of, shard_shape
from ucp.universal._checkpoint import chunk_shape, to_numpy
from ucp.resharder import load_rank_state


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(shard, "SHARD_BYTES", 200_000)  # several shards per array below


def _state():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(700, 333, generator=g), "e": torch.randn(1000, 96, generator=g).bfloat16(),
            "b": torch.randn(5, generator=g), "i": torch.arange(24, dtype=torch.int64).reshape(2, 3, 4),
            "empty": torch.zeros(0, 5)}


def _convert(tmp_path, state):
    ucp.save({"model": state}, str(tmp_path / "n"), step=1).wait()
    return ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.numel() else t


def test_shard_shape_cuts_dim0_in_whole_chunks():
    inner = chunk_shape((4096, 4096), 4)
    assert shard_shape((4096, 4096), inner, 4, limit=1 << 40) == (4096, 4096)
    cut = shard_shape((4096, 4096), inner, 4, limit=16 << 20)
    assert cut[1] == 4096 and cut[0] % inner[0] == 0 and cut[0] * 4096 * 4 <= 16 << 20
    assert shard_shape((10, 7), (4, 4), 4) == (12, 8)  # rounded up to whole inner chunks
    assert shard_shape((10,), (4,), 4, limit=1) == (4,)  # never below one row of chunks


def test_round_trip_through_ucp_and_zarr(tmp_path, small_shards):
    state = _state()
    ckpt = _convert(tmp_path, state)
    files = {p.parent.parent.name: len(list(p.parent.glob("c.*")))
             for p in (tmp_path / "u" / "params").glob("*/*/zarr.json")}
    assert files["w"] >= 700 * 333 * 4 // 200_000 and files["b"] == 1  # several shards; one for a small array
    for name, t in state.items():
        got = ckpt.read(name, "param")
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(_bits(got), _bits(t)), name
        if t.ndim == 2 and t.numel():
            region = (slice(37, 611), slice(5, 91))
            assert torch.equal(_bits(ckpt.read(name, "param", region)), _bits(t[region])), name
        # zarr itself reads ucp's shards (the format is plain zarr v3)
        state_dir = "fp32" if t.dtype == torch.float32 else "param"
        arr = zarr.open_array(str(tmp_path / "u" / "params" / name / state_dir), mode="r")
        want = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert np.array_equal(arr[...].view(want.dtype), want), name
    got = load_rank_state(str(tmp_path / "u"), "dp=3,zero=3", 2)["model"]
    for name in ("w", "e"):
        flat = state[name].reshape(-1)
        part = -(-flat.numel() // 3)
        want = torch.cat([flat, flat.new_zeros(3 * part - flat.numel())])[2 * part:]
        assert torch.equal(_bits(got[name]), _bits(want)), name


def test_layout_of_reads_what_the_writer_writes(tmp_path, small_shards):
    _convert(tmp_path, _state())
    meta = json.loads((tmp_path / "u" / "params" / "w" / "fp32" / "zarr.json").read_text())
    layout = layout_of(meta)
    assert layout is not None and layout.shape == (700, 333) and layout.shard is not None
    assert layout.chunks == chunk_shape((700, 333), 4)
    assert layout.locate((0, 0)) == ("c.0.0", 0) and layout.locate((3, 0))[0] == f"c.{3 * layout.chunks[0] // layout.shard[0]}.0"
    meta["codecs"][0]["configuration"]["index_location"] = "start"
    assert layout_of(meta) is None  # not ucp's layout: read through zarr


def _shard_file(tmp_path, name="w", state="fp32", which=-1):
    return sorted((tmp_path / "u" / "params" / name / state).glob("c.*"))[which]


@pytest.mark.parametrize("where", ["index", "chunk", "truncate", "index-entry"])
def test_damaged_shard_is_named_by_every_reader(tmp_path, small_shards, where):
    _convert(tmp_path, _state())
    f = _shard_file(tmp_path)
    raw = bytearray(f.read_bytes())
    if where == "index":
        raw[-7] ^= 0x01
    elif where == "chunk":
        raw[3] ^= 0x80
    elif where == "truncate":
        raw = raw[:len(raw) // 2]
    else:  # a consistent index (its CRC recomputed) whose first entry points one byte off
        from crc32c import crc32c
        layout = layout_of(json.loads((tmp_path / "u" / "params" / "w" / "fp32" / "zarr.json").read_text()))
        nidx = layout.index_bytes
        table = np.frombuffer(bytes(raw[-nidx:-4]), dtype="<u8").copy()
        table[0] += 1
        raw[-nidx:] = table.tobytes() + crc32c(table.tobytes()).to_bytes(4, "little")
    f.write_bytes(bytes(raw))
    rel = f.relative_to(tmp_path / "u").as_posix()
    with pytest.raises(ucp.UcpError, match=rel):
        ucp.open(str(tmp_path / "u")).read("w")
    with pytest.raises(ucp.UcpError, match=rel):
        load_rank_state(str(tmp_path / "u"), "dp=1", 0)
    with pytest.raises(ucp.UcpError, match=rel):  # a strided region: read through zarr, named after
        ucp.open(str(tmp_path / "u")).read("w", region=(slice(None, None, 2), slice(None)))


def test_flipped_array_metadata_is_named_by_its_crc(tmp_path):
    _convert(tmp_path, _state())
    meta = tmp_path / "u" / "params" / "w" / "fp32" / "zarr.json"
    raw = bytearray(meta.read_bytes())
    raw[raw.index(b'"chunk_shape"') + 17] ^= 0x01  # a digit of the shard shape
    meta.write_bytes(bytes(raw))
    with pytest.raises(ucp.ChecksumError, match="params/w/fp32/zarr.json: CRC32C"):
        ucp.open(str(tmp_path / "u")).read("w")
    with pytest.raises(ucp.ChecksumError, match="params/w/fp32/zarr.json: CRC32C"):
        load_rank_state(str(tmp_path / "u"), "dp=1", 0)


def test_unsharded_arrays_of_older_checkpoints_read_directly(tmp_path):
    """An array in the one-file-per-chunk layout (universal checkpoints before shards), written by
    zarr itself, reads the same through both of ucp's readers."""
    from crc32c import crc32c
    from zarr.codecs import Crc32cCodec

    from ucp.native._meta import seal

    state = _state()
    _convert(tmp_path, state)
    root = tmp_path / "u"
    path = root / "params" / "w" / "fp32"
    old = zarr.open_array(str(path), mode="r")
    data, attrs = old[...], dict(old.attrs)
    new = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=old.chunks,
                            compressors=[Crc32cCodec()], attributes=attrs, overwrite=True, fill_value=0,
                            config={"write_empty_chunks": True})
    new[...] = data
    meta = json.loads((path / "zarr.json").read_text())
    layout = layout_of(meta)
    assert layout is not None and layout.shard is None  # ucp's plain layout: read directly
    assert len(list((path / "c").rglob("*"))) > 4
    doc = json.loads((root / "zarr.json").read_text())
    doc["attributes"]["ucp"]["params"]["w"]["meta_crc32c"]["fp32"] = crc32c((path / "zarr.json").read_bytes())
    doc["attributes"]["ucp"] = seal(doc["attributes"]["ucp"])
    (root / "zarr.json").write_text(json.dumps(doc))
    ckpt = ucp.open(str(root))
    assert torch.equal(ckpt.read("w"), state["w"])
    assert torch.equal(ckpt.read("w", region=(slice(100, 300), slice(7, 200))), state["w"][100:300, 7:200])
    got = load_rank_state(str(root), "dp=3,zero=3", 1)["model"]["w"]
    flat = state["w"].reshape(-1)
    part = -(-flat.numel() // 3)
    assert torch.equal(got, flat[part:2 * part])


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple), limit=st.integers(1, 4000),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.int8]), data=st.data())
def test_tiled_shards_encode_the_same_bytes_and_fingerprints(shape, limit, dtype, data):
    """The row-at-a-time encoder (reused buffer, one fingerprint pass per row) writes byte for byte
    what the chunk-at-a-time one does, for any shape, chunking of the leading dims and shard cut,
    and its rows' fingerprints add up to the array's."""
    from ucp.core._fingerprint import combine, fingerprint
    from ucp.universal._tiles import RowBuffer, TiledShard

    t = (torch.randn(shape, dtype=torch.float64) * 50).to(dtype)
    a = to_numpy(t)
    inner = tuple(data.draw(st.integers(1, n)) for n in shape[:2]) + shape[2:]
    outer = shard_shape(shape, inner, a.itemsize, limit=limit)
    rows, prints, reference = RowBuffer(), {}, {}
    for k in range(-(-shape[0] // outer[0])):
        idx = (k,) + (0,) * (len(shape) - 1)
        tiled = TiledShard(a, inner, outer, idx, rows=rows, prints=prints)
        plain = ShardParts(a, inner, outer, idx, reference)
        assert b"".join(bytes(b) for b in tiled) == b"".join(bytes(b) for b in plain), idx
        tiled.settle()  # the last row's fingerprint runs on a helper thread
        assert tiled.total() == plain.total()
    assert combine(prints.values()) == combine(reference.values()) == fingerprint(torch.from_numpy(a))


def _as_format_1(root):
    """Rewrites a universal checkpoint as format 1 wrote it: shards keyed ``c/i/j`` (a directory
    per dim), ``separator: "/"``, ``format_version: 1``, the table's CRC32Cs and seal to match."""
    from crc32c import crc32c

    from ucp.core._sealed import seal

    doc = json.loads((root / "zarr.json").read_text())
    table = doc["attributes"]["ucp"]
    arrays = [(e, s) for e in table["params"].values() for s in e["states"]]
    for entry, state in [*arrays, *((e, None) for e in table["buffers"].values())]:
        path = root / entry["path"] / (state or "")
        meta = json.loads((path / "zarr.json").read_text())
        meta["chunk_key_encoding"]["configuration"]["separator"] = "/"
        (path / "zarr.json").write_text(json.dumps(meta))
        for f in path.glob("c.*"):
            dst = path.joinpath("c", *f.name.split(".")[1:])
            dst.parent.mkdir(parents=True, exist_ok=True)
            f.rename(dst)
        crc = crc32c((path / "zarr.json").read_bytes())
        entry["meta_crc32c"] = crc if state is None else {**entry["meta_crc32c"], state: crc}
    table["format_version"] = 1
    doc["attributes"]["ucp"] = seal({k: v for k, v in table.items() if k != "checksum"})
    (root / "zarr.json").write_text(json.dumps(doc))


def test_format_2_has_no_directory_per_dim_and_format_1_still_reads(tmp_path, small_shards):
    """Format 2 keeps an array's shards beside its zarr.json (one directory per array); a
    format-1 checkpoint (``c/i/j``) reads bit for bit through ucp's readers, verify --deep and zarr."""
    from ucp.ops._verify import verify_checkpoint

    state = _state()
    _convert(tmp_path, state)
    root = tmp_path / "u"
    assert json.loads((root / "zarr.json").read_text())["attributes"]["ucp"]["format_version"] == 2
    arrays = [p.parent for p in root.glob("params/*/*/zarr.json")]
    assert {d.relative_to(root).as_posix() for d in root.rglob("*") if d.is_dir()} == \
        {"params", *(f"params/{n}" for n in state), *(a.relative_to(root).as_posix() for a in arrays)}
    _as_format_1(root)
    assert not list(root.rglob("c.*")) and list(root.rglob("c/*/*"))
    ckpt = ucp.open(str(root))
    for name, t in state.items():
        assert torch.equal(_bits(ckpt.read(name, "param")), _bits(t)), name
        if t.ndim == 2 and t.numel():
            region = (slice(3, 41), slice(5, 91))
            assert torch.equal(_bits(ckpt.read(name, "param", region)), _bits(t[region])), name
            want = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            state_dir = "fp32" if t.dtype == torch.float32 else "param"
            got = zarr.open_array(str(root / "params" / name / state_dir), mode="r")[...]
            assert np.array_equal(got.view(want.dtype), want), name
    got = load_rank_state(str(root), "dp=3,zero=3", 2)["model"]["w"]
    part = -(-state["w"].numel() // 3)
    assert torch.equal(got, state["w"].reshape(-1)[2 * part:])
    report = verify_checkpoint(str(root), deep=True, progress=False)
    assert report.ok and report.checked["chunks"] > 0, report.problems


def test_filesystem_work_per_array_is_one_directory_and_two_files(tmp_path, monkeypatch):
    """Each directory is made once (no mkdir, stat or rename per file) and an array is one
    directory holding its zarr.json and one shard: the per-array cost of a conversion."""
    import os

    state = {f"p{i}": torch.randn(300, 40) for i in range(3)}
    ucp.save({"model": state}, str(tmp_path / "n"), step=1).wait()
    calls = {"mkdir": 0, "rename": 0}
    mkdir, replace = os.mkdir, os.replace

    def counted(name, fn):
        def call(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return call
    monkeypatch.setattr(os, "mkdir", counted("mkdir", mkdir))
    monkeypatch.setattr(os, "replace", counted("rename", replace))
    ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)
    root = tmp_path / "u"
    dirs = [p for p in root.rglob("*") if p.is_dir()]
    assert len(dirs) == 1 + 3 + 3  # params/, one per parameter, one per array (fp32 only)
    assert calls["mkdir"] == len(dirs) + 1  # and the build directory beside DST
    assert calls["rename"] <= 2  # the group metadata's atomic writes (begin, commit)
    for array in root.glob("params/*/fp32"):
        assert sorted(p.name for p in array.iterdir()) == ["c.0.0", "zarr.json"]
