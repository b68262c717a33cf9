"""Fuzzing (hypothesis) of the DeepSpeed reader's metadata handling: the unpickled structures of a
ZeRO checkpoint's files (what ``load_index`` returns: dicts, lists, numbers and TensorRefs) are
mutated anywhere, values replaced by junk, negative or huge numbers, or TensorRefs with other
shapes, strides, offsets and dtypes. Opening, listing and reading every state then raises only
UcpError, and never allocates more than the files hold.

A pickle that would run code is refused before anything is unpickled:
tests/engines/test_deepspeed_reader.py::test_pickle_payload_is_refused_without_running and
::test_payload_through_an_allowed_name_is_refused (their side effect is checked absent)."""

from __future__ import annotations

import copy
import os
import dataclasses
import importlib.util
import resource
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ucp
from ucp.engines.deepspeed import _reader as _deepspeed_reader
from ucp.engines.deepspeed._files import TensorRef, _check_view, load_index

#: scripts/reliability.py raises the example counts through UCP_FUZZ_EXAMPLES.
_SCALE = int(os.environ.get("UCP_FUZZ_EXAMPLES", "0"))
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                      HealthCheck.function_scoped_fixture])


def _write_fake_zero():
    path = Path(__file__).resolve().parents[1] / "engines" / "conftest.py"
    spec = importlib.util.spec_from_file_location("ucp_tests_engines_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.write_fake_zero


@pytest.fixture(scope="module", params=[1, 2, 3])
def trees(request, tmp_path_factory):
    """The real unpickled structures of a small ZeRO-``stage`` checkpoint, by file."""
    root = tmp_path_factory.mktemp(f"z{request.param}") / "ckpt"
    _write_fake_zero()(root, stage=request.param, dp=2,
                       groups=[[("a.w", (4, 3)), ("a.b", (3,))], [("c.w", (5,))]], frozen=[("f.w", (2, 2))])
    files = sorted((root / "global_step3").iterdir())
    return root, {str(p): load_index(p) for p in files}


# What a pickle controls of a tensor (its storage's place and size come from the zip records).
_REF_FIELDS = st.sampled_from(["shape", "stride", "offset", "dtype"])
_INTS = st.one_of(st.integers(-3, 40), st.integers(-2**40, 2**40), st.sampled_from([0, 1, 2, 2**31, 2**63 - 1]))


@st.composite
def _junk(draw, like=None):
    if isinstance(like, TensorRef) and draw(st.booleans()):
        field = draw(_REF_FIELDS)
        if field in ("shape", "stride"):
            value = tuple(draw(st.lists(_INTS, max_size=3)))
        elif field == "dtype":
            value = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]))
        else:
            value = draw(_INTS)
        return dataclasses.replace(like, **{field: value})
    return draw(st.one_of(
        st.none(), st.booleans(), _INTS, st.floats(allow_nan=True), st.text(max_size=6),
        st.lists(_INTS, max_size=3), st.dictionaries(st.text(max_size=4), _INTS, max_size=2),
        st.builds(torch.Size, st.lists(st.integers(-2, 9), max_size=3)),
        st.builds(lambda k: OrderedDict([(k, torch.Size([3]))]), st.text(max_size=4))))


def _slots(node, prefix=()):
    """Every replaceable position in an unpickled tree (dict values, list items)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _slots(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _slots(v, prefix + (i,))


def _mutate(trees: dict[str, object], data) -> dict[str, object]:
    trees = copy.deepcopy(trees)
    for _ in range(data.draw(st.integers(1, 4))):
        path = data.draw(st.sampled_from(sorted(trees)))
        slot = data.draw(st.sampled_from(list(_slots(trees[path]))))
        if not slot:
            trees[path] = data.draw(_junk())
            continue
        parent = trees[path]
        for k in slot[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and data.draw(st.integers(0, 4)) == 0:
            del parent[slot[-1]]
        else:
            parent[slot[-1]] = data.draw(_junk(parent[slot[-1]]))
    return trees


def _as_loaded(tree):
    """What load_index would return for such a pickle: it checks every tensor's view."""
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, TensorRef):
            _check_view(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return tree


def _exercise(root: Path) -> None:
    with _deepspeed_reader.DeepSpeedCheckpoint(root) as ckpt:
        ckpt.topology, ckpt.param_groups(), ckpt.buffers()
        for name in ckpt.names():
            for state in ckpt.info(name).states:
                t = ckpt.read(name, state)
                assert t.numel() < 10_000, (name, state, t.shape)  # the files hold ~200 elements


@settings(max_examples=_SCALE or 250, **SETTINGS)
@given(data=st.data())
def test_reader_metadata(trees, data, monkeypatch):
    root, real = trees
    fuzzed = _mutate(real, data)

    def fake_load_index(path, *, allow_unsafe_pickle=False):
        return _as_loaded(copy.deepcopy(fuzzed[str(path)]))

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with monkeypatch.context() as m:
        m.setattr(_deepspeed_reader, "load_index", fake_load_index)
        try:
            _exercise(root)
        except ucp.UcpError:
            pass
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024 < 256


def test_overlapping_view_is_refused_before_reading(tmp_path):
    """An expanded (stride-0) view of a 4-byte storage claiming 2^28 elements: 2 KB on disk."""
    tag = tmp_path / "global_step1"
    tag.mkdir()
    (tmp_path / "latest").write_text("global_step1")
    torch.save({"module": {"w": torch.ones(1).expand(2**28), "b": torch.ones(3)}, "buffer_names": [],
                "dp_world_size": 1, "mp_world_size": 1}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ucp.CorruptCheckpointError, match=r"shape \[268435456\] \(strides \[0\].*overlap"):
        _exercise(tmp_path)
