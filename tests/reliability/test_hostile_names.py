"""Hostile names (``../``, absolute paths, NUL, very long, look-alikes of ucp's own files) in every
input format ucp reads: ucp's own state keys, DeepSpeed parameter names, DCP keys, and names in a
universal checkpoint. Nothing is written or read outside the checkpoint roots, and names that do
not break anything round-trip exactly."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

import ucp

HOSTILE = ["../escape", "../../../../../../tmp/ucp-escape", "/abs/path", "a\x00b", "x" * 5000, "..", ".",
           "a/../../b", "C:\\windows", "%2e%2e%2fx", "\u202egnp.exe", "zarr.json", "c", "manifest.json",
           "step-00000001", "latest", "~root", " ", "a\nb"]


def _tree(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def sandbox(tmp_path):
    """tmp_path/box/... holds the checkpoints; anything that appears elsewhere below tmp_path, or
    in /tmp/ucp-escape, escaped."""
    box = tmp_path / "a" / "b" / "box"
    box.mkdir(parents=True)
    (tmp_path / "sentinel").write_text("x")
    before = _tree(tmp_path)
    yield box
    after = {p for p in _tree(tmp_path) - before if not p.startswith(os.path.join("a", "b", "box") + os.sep)}
    assert after == set(), f"written outside the checkpoint roots: {sorted(after)[:5]}"
    assert not os.path.exists("/tmp/ucp-escape") and not os.path.exists("/abs")
    for p in _tree(box):
        assert os.path.realpath(box / p).startswith(str(box.resolve()) + os.sep), p


def _tensors(names):
    return {n: torch.full((3, 2), float(i)) for i, n in enumerate(names)}


def _check_universal(url: str, expected: dict[str, torch.Tensor], state: str = "fp32") -> None:
    ckpt = ucp.open(url)
    assert set(ckpt.names()) == set(expected)
    for n, t in expected.items():
        assert torch.equal(ckpt.read(n, state), t), repr(n)


def test_native_state_keys(sandbox):
    model = _tensors(HOSTILE)
    state = {"model": model, "optim": {"state": {n: {"exp_avg": t + 1} for n, t in model.items()},
                                       "param_groups": [{"params": list(model), "lr": 0.1}]},
             "../meta": {"/abs": "v", "a\x00b": [1, 2]}}
    ucp.save(state, str(sandbox / "n"), step=1).wait()
    back = ucp.load(str(sandbox / "n"))
    assert set(back["model"]) == set(HOSTILE) and back["../meta"] == {"/abs": "v", "a\x00b": [1, 2]}
    assert all(torch.equal(back["model"][n], t) for n, t in model.items())
    ucp.convert(str(sandbox / "n"), str(sandbox / "u"), progress=False)
    _check_universal(str(sandbox / "u"), model)
    ckpt = ucp.open(str(sandbox / "u"))
    assert torch.equal(ckpt.read("../escape", "exp_avg"), model["../escape"] + 1)


def test_hostile_optimizer_state_name_cannot_leave_the_root(sandbox):
    state = {"model": {"w": torch.ones(2)}, "optim": {"state": {"w": {"../../../../x": torch.ones(2)}},
                                                      "param_groups": [{"params": ["w"]}]}}
    ucp.save(state, str(sandbox / "n"), step=1).wait()
    try:
        ucp.convert(str(sandbox / "n"), str(sandbox / "u"), progress=False)
    except ucp.UcpError as e:
        assert isinstance(e, (ucp.UnsafeInputError, ucp.ConvertError)), e
    else:
        ckpt = ucp.open(str(sandbox / "u"))
        assert torch.equal(ckpt.read("w", "../../../../x"), torch.ones(2))


def _fake_zero():
    path = Path(__file__).resolve().parents[1] / "engines" / "conftest.py"
    spec = importlib.util.spec_from_file_location("ucp_tests_engines_conftest", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.write_fake_zero


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_parameter_names(sandbox, stage):
    names = [n for n in HOSTILE if n not in ("mask", "scale")]
    ckpt = _fake_zero()(sandbox / "ds", stage=stage, dp=2, groups=[[(n, (3, 2)) for n in names[:10]],
                                                                   [(n, (4,)) for n in names[10:]]])
    ucp.convert(str(sandbox / "ds"), str(sandbox / "u"), progress=False)
    _check_universal(str(sandbox / "u"), {n: s["fp32"] for n, s in ckpt.expected.items()})


def test_dcp_keys(sandbox):
    import torch.distributed.checkpoint as dcp

    model = _tensors([n for n in HOSTILE if "." not in n])  # DCP joins nested keys with "."
    dcp.save({"model": model}, checkpoint_id=str(sandbox / "dcp"), no_dist=True)
    ucp.convert(str(sandbox / "dcp"), str(sandbox / "u"), progress=False)
    _check_universal(str(sandbox / "u"), model)


def test_universal_names_with_a_consistent_table(sandbox):
    """Names are only keys: what a hostile table can point at is its paths (checked on open)."""
    model = _tensors(HOSTILE)
    ucp.save({"model": model}, str(sandbox / "n"), step=1).wait()
    ucp.convert(str(sandbox / "n"), str(sandbox / "u"), progress=False)
    ckpt = ucp.open(str(sandbox / "u"))
    paths = {ckpt.meta.params[n].path for n in HOSTILE}
    assert len(paths) == len(HOSTILE) and all(p.startswith("params/") and ".." not in p.split("/") for p in paths)
