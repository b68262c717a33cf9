"""The manifest's catalog (format version 2): ranks grouped by layout, so a resuming rank reads one
rank index per group and, lazily, only the indexes of the ranks whose bytes it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ucp
from ucp.native._catalog import dtensor_region, group_ranks, layout_digest
from ucp.core._errors import CorruptCheckpointError
from ucp.native._layout import read_manifest
from ucp.native._meta import MeshInfo, TensorFragment, dumps
from ucp.native._source import NativeCheckpoint
from ucp.storage import Storage, read_counter


@pytest.mark.parametrize("gshape,placements,mesh", [
    ((5, 7), ("S(0)", "S(1)"), (2, 3)),
    ((9, 4), ("S(0)", "S(0)"), (2, 2)),
    ((3, 4), ("S(0)", "R"), (4, 2)),  # more shards than rows: empty pieces
    ((10,), ("R", "S(0)", "S(0)"), (2, 3, 2)),
])
def test_dtensor_region_is_torch_rule(gshape, placements, mesh):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    torch_pl = [Replicate() if p == "R" else Shard(int(p[2:-1])) for p in placements]
    import itertools

    for coords in itertools.product(*(range(n) for n in mesh)):
        shape, offsets = _compute_local_shape_and_global_offset(gshape, mesh, list(coords), torch_pl)
        assert dtensor_region(gshape, placements, mesh, coords) == (tuple(offsets), tuple(shape))


def test_group_ranks_by_digest():
    statuses = [{"rank": r, "layout": "a" if r % 4 < 2 else "b"} for r in range(8)]
    assert group_ranks(statuses) == [{"index": 0, "ranks": [[0, 2], [4, 6]]},
                                     {"index": 2, "ranks": [[2, 4], [6, 8]]}]
    assert group_ranks([{"rank": 0, "layout": "a"}, {"rank": 1}]) is None  # a rank of an older ucp


def test_digest_ignores_regions_and_numbers_not_structure():
    mesh = MeshInfo(shape=(2,), ranks=(0, 1))
    a = TensorFragment("w", "float32", (2, 4), (4, 4), (0, 0), ("S(0)",), 0, crc32c=1)
    b = TensorFragment("w", "float32", (2, 4), (4, 4), (2, 0), ("S(0)",), 0, crc32c=2)
    tree = {"model": {"w": {"@t": "w"}}, "lr": 0.1}
    assert layout_digest(tree, [a], [mesh]) == layout_digest({**tree, "lr": 0.2}, [b], [mesh])
    assert layout_digest(tree, [a], [mesh]) != layout_digest({**tree, "x": "y"}, [a], [mesh])
    other = MeshInfo(shape=(2,), ranks=(2, 3))
    assert layout_digest(tree, [a], [mesh]) != layout_digest(tree, [a], [other])


def save_dtensors(rank, world, url):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    g = torch.Generator().manual_seed(0)
    full = {"a": torch.randn(5, 7, generator=g), "b": torch.randn(9, 4, generator=g),
            "c": torch.randn(6, 3, generator=g)}
    model = {"a": distribute_tensor(full["a"], mesh, [Shard(0), Shard(1)]),
             "b": distribute_tensor(full["b"], mesh, [Shard(0), Shard(0)]),
             "c": distribute_tensor(full["c"], mesh["tp"], [Shard(1)]),  # a mesh per dp row
             "n": full["c"][0].clone()}  # a plain replicated tensor
    state = {"model": model, "optim": {"state": {k: {"exp_avg": v * 2} for k, v in model.items()},
                                       "param_groups": [{"params": sorted(model), "lr": 0.1}]}}
    ucp.save(state, url, step=1).wait()
    return True


@pytest.fixture(scope="module")
def dtensor_ckpt(tmp_path_factory):
    from ucp.testing import run_ranks

    root = tmp_path_factory.mktemp("catalog") / "ckpt"
    run_ranks(save_dtensors, 4, args=(str(root),))
    return root


def test_commit_writes_catalog_and_lazy_reads_equal_eager(dtensor_ckpt):
    storage = Storage(str(dtensor_ckpt))
    manifest = read_manifest(storage, 1)
    assert manifest.format_version == 2
    assert [g.index for g in manifest.catalog] == [0, 2]  # "c" is on a mesh per dp row
    # only representatives send their meshes to rank 0; the manifest still has every one
    assert sorted(m.ranks for m in manifest.meshes) == [(0, 1), (0, 1, 2, 3), (2, 3)]
    eager = NativeCheckpoint(storage, manifest)
    before = read_counter()
    lazy = NativeCheckpoint(storage, manifest, lazy=True)
    assert (read_counter() - before).calls == 2  # the two representatives' indexes, no file checks
    assert lazy.names() == eager.names() and lazy.param_groups() == eager.param_groups()
    for name in eager.names():
        assert lazy.info(name) == eager.info(name)
        for state in ("param", "exp_avg"):
            assert torch.equal(lazy.read(name, state), eager.read(name, state))
            region = tuple((1, max(2, n - 1)) for n in eager.info(name).shape)
            assert torch.equal(lazy.read(name, state, region), eager.read(name, state, region))


def test_lazy_region_read_reads_only_the_owners_indexes(dtensor_ckpt):
    storage = Storage(str(dtensor_ckpt))
    lazy = NativeCheckpoint(storage, read_manifest(storage, 1), lazy=True)
    before = read_counter()
    lazy.read("b", "exp_avg", ((0, 2), (0, 4)))  # rows 0-1: rank 0's piece only
    after = read_counter() - before
    # rank 0's index is cached (a representative); its data header and blocks: no other index
    assert lazy._index_cache.keys() == {0, 2}
    assert after.calls <= 3


def _rewrite_manifest(root: Path, edit) -> None:
    path = root / "step-00000001" / "manifest.json"
    doc = json.loads(path.read_text())
    doc.pop("checksum")
    edit(doc)
    path.write_bytes(dumps(doc))


def test_version_1_manifest_is_read_without_catalog(dtensor_ckpt, tmp_path):
    import shutil

    root = tmp_path / "v1"
    shutil.copytree(dtensor_ckpt, root)

    def to_v1(doc):
        doc["format_version"] = 1
        del doc["catalog"]
    _rewrite_manifest(root, to_v1)
    storage = Storage(str(root))
    manifest = read_manifest(storage, 1)
    assert manifest.format_version == 1 and manifest.catalog is None
    lazy = NativeCheckpoint(storage, manifest, lazy=True)  # no catalog: every index, as before
    assert lazy._index_cache.keys() == {0, 1, 2, 3}
    eager = NativeCheckpoint(Storage(str(dtensor_ckpt)), read_manifest(Storage(str(dtensor_ckpt)), 1))
    assert torch.equal(lazy.read("a", "param"), eager.read("a", "param"))


@pytest.mark.parametrize("catalog", [
    [{"index": 0, "ranks": [[0, 3]]}, {"index": 2, "ranks": [[2, 4]]}],  # rank 2 twice
    [{"index": 0, "ranks": [[0, 3]]}],  # rank 3 in no group
    [{"index": 1, "ranks": [[0, 4]]}],  # the representative is not the lowest rank
    [{"index": 0, "ranks": [[0, 4, 5]]}],
    "all",
])
def test_damaged_catalog_is_refused(dtensor_ckpt, tmp_path, catalog):
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(dtensor_ckpt, root)
    _rewrite_manifest(root, lambda doc: doc.update(catalog=catalog))
    with pytest.raises(CorruptCheckpointError, match="catalog|ranks"):
        read_manifest(Storage(str(root)), 1)


def _rewrite_index(root: Path, rank: int, doc: dict) -> None:
    """Replaces a rank index (resealed) and its record in the manifest."""
    import crc32c

    raw = dumps(doc)
    (root / "step-00000001" / f"rank-{rank:05d}.json").write_bytes(raw)
    _rewrite_manifest(root, lambda m: m["files"].update(
        {f"rank-{rank:05d}.json": {"size": len(raw), "crc32c": crc32c.crc32c(raw)}}))


def test_member_index_holds_only_what_differs(dtensor_ckpt):
    step = dtensor_ckpt / "step-00000001"
    member, rep = (json.loads((step / f"rank-{r:05d}.json").read_text()) for r in (1, 0))
    assert member["like"] == 0 and "fragments" not in member and "tree" not in member
    assert (step / "rank-00001.json").stat().st_size < (step / "rank-00000.json").stat().st_size / 2
    storage = Storage(str(dtensor_ckpt))
    from ucp.native._load import read_rank_index

    whole = read_rank_index(storage, read_manifest(storage, 1), 1)
    assert [f.key for f in whole.fragments] == [f["key"] for f in rep["fragments"]]
    assert whole.fragments[0].offsets != tuple(rep["fragments"][0]["offsets"])  # its own region


def test_member_of_another_layout_is_refused(dtensor_ckpt, tmp_path):
    import shutil

    root = tmp_path / "other"
    shutil.copytree(dtensor_ckpt, root)
    doc = json.loads((root / "step-00000001" / "rank-00003.json").read_text())
    doc.pop("checksum")
    doc["like"] = 0  # rank 3 saved "c" on the other dp row's mesh: not rank 0's layout
    _rewrite_index(root, 3, doc)
    storage = Storage(str(root))
    with pytest.raises(CorruptCheckpointError, match="did not save the layout of rank 0"):
        NativeCheckpoint(storage, read_manifest(storage, 1))


def test_version_1_rank_index_with_256_kib_blocks_is_read(tmp_path):
    """A version 1 save: whole indexes in indented JSON, checksums of 256 KiB blocks as lists."""
    from safetensors.torch import load_file

    from ucp.native._meta import block_checksums

    root = tmp_path / "old"
    w = torch.randn(1024, 1024)  # 4 MiB: 16 blocks of 256 KiB
    ucp.save({"model": {"w": w}}, str(root), step=1).wait()
    step = root / "step-00000001"
    doc = json.loads((step / "rank-00000.json").read_text())
    doc.pop("checksum")
    data = load_file(str(step / "rank-00000.safetensors"))["model/w"]
    blocks = block_checksums(memoryview(data.numpy()).cast("B"), 256 << 10)
    doc["fragments"][0]["blocks"] = {"bytes": 256 << 10, "crc32c": list(blocks)}
    doc["format_version"] = 1
    _rewrite_index(root, 0, doc)
    _rewrite_manifest(root, lambda m: (m.update(format_version=1), m.pop("catalog")))
    storage = Storage(str(root))
    source = NativeCheckpoint(storage, read_manifest(storage, 1), lazy=True)
    before = read_counter()
    part = source.read("w", "param", ((512, 520), (0, 1024)))
    assert torch.equal(part, w[512:520])
    assert (read_counter() - before).bytes < 2 * (256 << 10)  # one 256 KiB block (+ the header)


def test_chain_of_member_indexes_is_refused(dtensor_ckpt, tmp_path):
    """A representative's index must be whole: a hostile chain is refused, not followed."""
    import shutil

    root = tmp_path / "chain"
    shutil.copytree(dtensor_ckpt, root)
    doc = json.loads((root / "step-00000001" / "rank-00003.json").read_text())
    doc.pop("checksum")
    doc["like"] = 1  # rank 1's index is itself a member's
    _rewrite_index(root, 3, doc)
    storage = Storage(str(root))
    from ucp.native._load import read_rank_index

    with pytest.raises(CorruptCheckpointError, match="rank-00001.json: the index of a representative"):
        read_rank_index(storage, read_manifest(storage, 1), 3)
    with pytest.raises(CorruptCheckpointError, match=r"rank-00001\.json|of rank 1\b"):
        NativeCheckpoint(storage, read_manifest(storage, 1))  # refused, whichever index is read first


def test_block_size_follows_tensor_size(tmp_path):
    """256 KiB checksum blocks up to 16 MiB (partial reads of small tensors stay tight), 1 MiB
    above (fewer checksums for large jobs); each fragment records its own."""
    from ucp.native._load import read_rank_index

    state = {"model": {"small": torch.ones(1024, 1024), "big": torch.ones(5 * 1024, 1024)}}  # 4, 20 MiB
    ucp.save(state, str(tmp_path / "c"), step=1).wait()
    storage = Storage(str(tmp_path / "c"))
    index = read_rank_index(storage, read_manifest(storage, 1), 0)
    blocks = {f.key: (f.block_bytes, len(f.block_crc32c)) for f in index.fragments}
    assert blocks == {"model/small": (256 << 10, 16), "model/big": (1 << 20, 20)}
    source = NativeCheckpoint(storage, read_manifest(storage, 1))
    assert torch.equal(source.read("big", "param", ((4000, 4001), (0, 1024))), state["model"]["big"][4000:4001])
