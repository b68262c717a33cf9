"""Checkpoints that torchtitan 0.3 and accelerate (FSDP2 ``save_state``) write themselves, converted
by a plain ``ucp convert ROOT DST`` and compared bit for bit with the full state torch gathers in the
job (``_titan_make.py``, ``_accel_make.py``: 2 ranks, CPU, gloo, a few training steps)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got, want), f"{what} differs"


# -- torchtitan --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def titan_run(framework_job) -> Path:
    """A torchtitan job's output: ``checkpoint/step-{2,4}`` (full state), ``checkpoint/step-5`` (model
    only, torchtitan's last save) and ``full-4.pt``, ``full-5.pt``."""
    return framework_job("_titan_make", "make_titan", "torchtitan")


def _titan_moment(ref: dict[str, Any], name: str, state: str) -> torch.Tensor:
    """The job's gathered optimizer state of ``name``; the fused ``wqkv`` state cut by torchtitan's
    own save hook (``FusedQKVLinear._split_qkv_on_save``) for ``wq``/``wk``/``wv``."""
    prefix, part, suffix = name.rpartition(".")[0].rpartition(".")[0], name.split(".")[-2], name.split(".")[-1]
    if part not in ("wq", "wk", "wv"):
        return ref["optim"][f"state.{name}.{state}"]
    from torchtitan.models.common.attention import FusedQKVLinear

    q_per_kv = ref["heads"] // ref["kv_heads"]
    module = SimpleNamespace(head_dim=ref["head_dim"], heads_per_kv=q_per_kv, r_dim=q_per_kv + 2)
    sd = {f"{prefix}.wqkv.{suffix}": ref["optim"][f"state.{prefix}.wqkv.{suffix}.{state}"]}
    FusedQKVLinear._split_qkv_on_save(module, sd, f"{prefix}.", None)
    return sd[name]


@pytest.mark.slow
def test_torchtitan_root_converts_full_state(titan_run: Path, tmp_path: Path) -> None:
    ref = torch.load(titan_run / "full-4.pt", weights_only=True)
    root, dst = titan_run / "checkpoint", tmp_path / "universal"
    r = CliRunner().invoke(main, ["convert", str(root), str(dst), "--step", "4", "--spec",
                                  f"head_dim = {ref['head_dim']}", "-q"])
    assert r.exit_code == 0, r.output
    assert "torchtitan checkpoint folder: 3 step(s) (2, 4, 5), newest step-5" in r.output
    got = ucp.open(str(dst))
    assert got.step == 4 and sorted(got.names()) == sorted(ref["model"])
    fused = [n for n in got.names() if ".wq." in n or ".wk." in n or ".wv." in n]
    assert len(fused) == 6
    for name in got.names():
        _same(got.read(name, "fp32"), ref["model"][name], f"{name} fp32")
        for state in ("exp_avg", "exp_avg_sq"):
            _same(got.read(name, state), _titan_moment(ref, name, state), f"{name} {state}")
        decay = ref["optim"][f"param_groups.{name.replace('.wq.', '.wqkv.').replace('.wk.', '.wqkv.').replace('.wv.', '.wqkv.')}.weight_decay"]
        assert got.param_groups[got.info(name).group]["weight_decay"] == decay, name
    assert got.extras["lr_scheduler"] == ref["lr_scheduler"]
    assert got.extras["train_state"] == ref["train_state"]
    # head_dim told the reader how to cut; it is no layout spec for verify and reshard to apply
    assert got.spec is None and got.metadata["source"]["constants"] == {"head_dim": ref["head_dim"]}
    for checked in ([str(dst)], [str(root), "--step", "4", "--spec", f"head_dim = {ref['head_dim']}"]):
        r = CliRunner().invoke(main, ["verify", *checked])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["reshard", str(dst), str(tmp_path / "dp2"), "--to", "dp=2"])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_torchtitan_newest_step_is_its_model_only_last_save(titan_run: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ref = torch.load(titan_run / "full-5.pt", weights_only=True)
    got = ucp.convert(str(titan_run / "checkpoint"), str(tmp_path / "u"))  # plain: newest step
    assert got.step == 5 and sorted(got.names()) == sorted(ref["model"])
    for name in got.names():
        assert got.info(name).states == ("fp32",)
        _same(got.read(name, "fp32"), ref["model"][name], f"{name} fp32")
    assert "holds the model only" in caplog.text and "--step" in caplog.text


@pytest.mark.slow
def test_torchtitan_step_choice_and_missing_head_dim(titan_run: Path, tmp_path: Path) -> None:
    root = titan_run / "checkpoint"
    got = ucp.convert(str(root), str(tmp_path / "u2"), spec="head_dim = 16", tag="2")
    assert got.step == 2 and got.extras["train_state"]["step"] == 2
    r = CliRunner().invoke(main, ["convert", str(root), str(tmp_path / "u"), "--step", "4"])
    assert r.exit_code == 1
    assert "wqkv" in r.output and "--spec 'head_dim = " in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["convert", str(root), str(tmp_path / "u3"), "--step", "4", "--spec", "head_dim = 5"])
    assert r.exit_code == 1 and "head_dim = 5 does not fit" in r.output


# -- accelerate --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def accelerate_run(framework_job) -> Path:
    """An accelerate FSDP2 job's output: ``state/`` (save_state) and ``full.pt``."""
    return framework_job("_accel_make", "make_accelerate", "accelerate")


@pytest.mark.slow
def test_accelerate_save_state_converts_full_state(accelerate_run: Path, tmp_path: Path) -> None:
    ref = torch.load(accelerate_run / "full.pt", weights_only=True)
    dst = tmp_path / "universal"
    r = CliRunner().invoke(main, ["convert", str(accelerate_run / "state"), str(dst), "-q"])
    assert r.exit_code == 0, r.output
    assert "accelerate FSDP save_state: pytorch_model_fsdp_0/ + optimizer_0/" in r.output
    got = ucp.open(str(dst))
    frozen = "model.norm.weight"
    assert sorted(got.names()) == sorted([*ref["optim"]["state"], frozen]) and frozen not in ref["optim"]["state"]
    assert got.step == 3 and got.info(frozen).frozen and got.info(frozen).states == ("fp32",)
    for name in got.names():
        _same(got.read(name, "fp32"), ref["model"][name], f"{name} fp32")
        for state in ("exp_avg", "exp_avg_sq") if name != frozen else ():
            _same(got.read(name, state), ref["optim"]["state"][name][state], f"{name} {state}")
    assert got.buffer_names() == ["logit_scale"]
    _same(got.read_buffer("logit_scale"), ref["model"]["logit_scale"], "buffer")
    groups = ref["optim"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in got.param_groups] == [(g["lr"], g["weight_decay"]) for g in groups]
    for i, g in enumerate(groups):
        assert all(got.info(n).group == i for n in g["params"])
    assert got.extras["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]
