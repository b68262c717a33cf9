"""Fuzzing (hypothesis) of the manifest and fragment-table readers: whatever the bytes or the JSON
structure, only a UcpError escapes; and a fuzzed (but correctly sealed and recorded) rank index
loaded end to end never crashes and never returns tensors it does not hold.

The UCL parser is fuzzed by tests/grammar/test_ucl_parse.py (syntax and semantics)."""

from __future__ import annotations

import copy
import os
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ucp
from ucp.native._meta import Manifest, RankIndex, TensorFragment, dumps, loads, seal
from ucp.storage import checksum

#: scripts/reliability.py raises the example counts through UCP_FUZZ_EXAMPLES.
_SCALE = int(os.environ.get("UCP_FUZZ_EXAMPLES", "0"))
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 70),
                     st.floats(allow_nan=False), st.text(max_size=12),
                     st.sampled_from(["float32", "bfloat16", "R", "S(0)", "S(9)", "P(sum)", "@t", "@d",
                                      "@tuple", "@f", "nan", "step-00000001", "../x", "\x00"]))
_JSON = st.recursive(_SCALARS, lambda c: st.one_of(st.lists(c, max_size=4),
                                                   st.dictionaries(st.text(max_size=8) | st.sampled_from(
                                                       ["key", "shape", "offsets", "global_shape", "dtype",
                                                        "mesh", "placements", "files", "size", "crc32c",
                                                        "@t", "@d", "@tuple", "@f"]), c, max_size=4)),
                     max_leaves=12)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _mutate(doc, data) -> object:
    """``doc`` with one to three of its values (any node, chosen uniformly) replaced by fuzz,
    or deleted, or its list grown by a copy of an element."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(list(_paths(doc))))
        if not path:
            return data.draw(_JSON)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        how = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "grow"]))
        if how == "delete":
            del parent[path[-1]]
        elif how == "grow" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        else:
            parent[path[-1]] = data.draw(_JSON)
    return doc


def _native(root: Path) -> Path:
    from torch.distributed.tensor import DTensor  # noqa: F401 - DTensor fragments need its import

    state = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2).bfloat16()},
             "t": (1, 2.5, {"@x": [None]}), 7: "seven", "inf": float("inf")}
    ucp.save(state, str(root), step=1).wait()
    return root


@pytest.fixture(scope="module")
def native_docs(tmp_path_factory):
    root = _native(tmp_path_factory.mktemp("fuzz") / "n")
    sd = root / "step-00000001"
    return (json.loads((sd / "manifest.json").read_text()), json.loads((sd / "rank-00000.json").read_text()),
            (sd / "rank-00000.safetensors").read_bytes())


@settings(max_examples=_SCALE or 300, **SETTINGS)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_loads_raw_bytes(raw):
    try:
        Manifest.from_dict(loads(raw, what="m"), what="m")
    except ucp.UcpError:
        pass


@settings(max_examples=_SCALE or 400, **SETTINGS)
@given(st.data())
def test_manifest_reader(native_docs, data):
    doc = _mutate(native_docs[0], data)
    if isinstance(doc, dict) and data.draw(st.booleans()):
        try:
            doc = seal(doc)  # past the checksum, into the field checks
        except ValueError:  # inf: JSON has no such number; loads() refuses the document anyway
            pass
    try:
        Manifest.from_dict(loads(json.dumps(doc).encode(), what="m"), what="m")
    except ucp.UcpError:
        pass


@settings(max_examples=_SCALE or 400, **SETTINGS)
@given(st.data())
def test_fragment_table_reader(native_docs, data):
    doc = _mutate(native_docs[1], data)
    try:
        index = RankIndex.from_dict(doc, what="r")
    except ucp.UcpError:
        return
    for f in index.fragments:
        assert isinstance(f, TensorFragment) and all(s >= 0 for s in f.shape)


@settings(max_examples=_SCALE or 150, **SETTINGS)
@given(st.data())
def test_load_with_a_fuzzed_rank_index(native_docs, data):
    """The fuzzed index is sealed and recorded in the manifest (as a buggy or hostile writer would
    do), so the load gets past every checksum into the structure, fragment and tensor checks."""
    manifest, index, shard = native_docs
    fuzzed = _mutate(index, data)
    try:
        raw = dumps(fuzzed) if isinstance(fuzzed, dict) else json.dumps(fuzzed).encode()
    except ValueError:  # inf cannot be sealed
        raw = json.dumps(fuzzed).encode()
    with tempfile.TemporaryDirectory() as d:
        sd = Path(d) / "step-00000001"
        sd.mkdir()
        (sd / "rank-00000.safetensors").write_bytes(shard)
        (sd / "rank-00000.json").write_bytes(raw)
        m = copy.deepcopy(manifest)
        crc, size = checksum([raw])
        m["files"]["rank-00000.json"] = {"size": size, "crc32c": crc}
        (sd / "manifest.json").write_bytes(dumps(m))
        try:
            back = ucp.load(d, rank=0)
        except ucp.UcpError:
            return
    _assert_tensors_from(back, shard)


def _assert_tensors_from(tree, shard: bytes) -> None:
    """Every tensor returned holds bytes of the shard (never memory it does not own)."""
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            assert x.numel() == 0 or bytes(x.contiguous().view(torch.uint8).numpy().tobytes()) in shard
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
