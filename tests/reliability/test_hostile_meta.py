"""Malformed metadata, negative or huge shapes and dtype confusion, written consistently (sealed,
recorded in the manifest) as a buggy or hostile writer would: a UcpError naming the file, memory
bounded by what the files hold, no crash. (Oversized files: test_oversized.py; universal tables
and arrays: test_universal_integrity.py; damage: test_damage.py.)"""

from __future__ import annotations

import json
import resource

import pytest
import torch

import ucp
from ucp.native._meta import dumps
from ucp.storage import checksum


def _rss_mib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


@pytest.fixture
def native(tmp_path):
    ucp.save({"model": {"w": torch.arange(16.0).reshape(4, 4), "b": torch.ones(4).bfloat16()}},
             str(tmp_path / "n"), step=1).wait()
    return tmp_path / "n"


def _rewrite_index(root, edit) -> None:
    """Edits rank-00000.json, then seals it and records it in the manifest (consistently)."""
    sd = root / "step-00000001"
    index = json.loads((sd / "rank-00000.json").read_text())
    edit(index)
    raw = dumps(index)
    (sd / "rank-00000.json").write_bytes(raw)
    manifest = json.loads((sd / "manifest.json").read_text())
    crc, size = checksum([raw])
    manifest["files"]["rank-00000.json"] = {"size": size, "crc32c": crc}
    (sd / "manifest.json").write_bytes(dumps(manifest))


def _frag(index, key):
    return next(f for f in index["fragments"] if f["key"] == key)


@pytest.mark.parametrize("edit,match", [
    (lambda i: _frag(i, "model/w").update(shape=[-4, 4], global_shape=[-4, 4]), "integers >= 0"),
    (lambda i: _frag(i, "model/w").update(shape=[4, 5], global_shape=[4, 5]), "differs from its fragment"),
    (lambda i: _frag(i, "model/w").update(dtype="bfloat16"), "differs from its fragment"),  # dtype confusion
    (lambda i: _frag(i, "model/w").update(dtype="complex128"), "differs from its fragment"),
    (lambda i: _frag(i, "model/w").update(offsets=[2**62, 0]), "outside global shape"),
    (lambda i: i.update(tree={"@t": "nowhere"}), "not in the fragment table"),
    (lambda i: i.update(tree={"@d": [[1]]}), "malformed '@d'"),
    (lambda i: i.update(tree=json.loads("[" * 90 + "]" * 90)), "deeper than"),
    (lambda i: i.update(fragments={"a": 1}), "field 'fragments'"),
], ids=["negative", "shape", "dtype", "unknown-dtype", "offset", "tree-key", "tree-tag", "nesting", "table"])
def test_inconsistent_rank_index(native, edit, match):
    _rewrite_index(native, edit)
    with pytest.raises(ucp.UcpError, match=match):
        ucp.load(str(native))


@pytest.mark.parametrize("rows", [2**28, 2**50])
def test_huge_dtensor_global_shape_in_convert(native, tmp_path, rows):
    """A fragment record claiming a 4 GiB / 2^52-element global tensor: refused before allocating."""
    def edit(index):
        f = _frag(index, "model/w")
        f.update(global_shape=[rows, 4], placements=["S(0)"], mesh=0)
        index["meshes"] = [{"shape": [1], "ranks": [0], "dim_names": None}]
    _rewrite_index(native, edit)
    before = _rss_mib()
    with pytest.raises(ucp.ConvertError, match="do not cover its global shape"):
        ucp.convert(str(native), str(tmp_path / "u"), progress=False)
    assert _rss_mib() - before < 256


def test_dtype_confusion_between_the_shard_and_its_record_in_convert(native, tmp_path):
    _rewrite_index(native, lambda i: _frag(i, "model/b").update(dtype="float16"))
    with pytest.raises(ucp.CorruptCheckpointError, match=r"rank-00000.safetensors: tensor 'model/b' is bfloat16"):
        ucp.convert(str(native), str(tmp_path / "u"), progress=False)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"format_version": 1, "files": ' + b"1" * 5000 + b"}",
                                 b'{"format_version": 1e999}', b"\xff\xfe{}", b"{}" * 10, b'"\\ud800"'])
def test_malformed_manifest_json(native, raw):
    (native / "step-00000001" / "manifest.json").write_bytes(raw)
    with pytest.raises(ucp.CorruptCheckpointError, match="manifest.json"):
        ucp.load(str(native))


@pytest.mark.parametrize("tag", ["../x", "step-1e9", "１２", "-5"])
def test_native_tag_that_is_not_a_step(native, tmp_path, tag):
    with pytest.raises(ucp.CheckpointNotFoundError):
        ucp.convert(str(native), str(tmp_path / "u"), tag=tag, progress=False)


def save_dtensor(rank, world, url):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,))
    ucp.save({"x": distribute_tensor(torch.arange(8.0), mesh, [Shard(0)])}, url, step=1).wait()


def test_dtensor_state_in_one_process_is_a_topology_error(run_ranks, tmp_path):
    """It used to be a bare ValueError from torch's env:// rendezvous."""
    root = tmp_path / "ckpt"
    run_ranks(save_dtensor, 2, args=(str(root),))
    with pytest.raises(ucp.TopologyError, match="'x' is a DTensor; rebuilding it needs torch.distributed"):
        ucp.load(str(root), rank=1)
    assert torch.equal(ucp.convert(str(root), str(tmp_path / "u"), progress=False).read("x"), torch.arange(8.0))
