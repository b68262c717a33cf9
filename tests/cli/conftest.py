"""Small checkpoints for the command-line tests, made once per session.

``sample`` is the directory docs/cli.md runs in: ``ckpt`` (a native checkpoint of a tiny GPT-2
with AdamW state, committed at steps 100 and 200, plus an uncommitted step 300), ``universal``
(``ckpt`` converted) and ``config.json`` (a GPT-2 config of the same sizes).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

import ucp

from ._sample import add_uncommitted, gpt2_config, gpt2_state, save_native

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def sample(tmp_path_factory) -> Path:
    """The docs/cli.md directory (read-only: copy before damaging anything)."""
    root = tmp_path_factory.mktemp("sample")
    save_native(root / "ckpt", gpt2_state(), topology="dp=1")
    add_uncommitted(root / "ckpt", 300)
    ucp.convert(str(root / "ckpt"), str(root / "universal"))
    (root / "config.json").write_text(json.dumps(gpt2_config(), indent=1))
    return root


@pytest.fixture
def copy_of(sample, tmp_path):
    """``copy_of("ckpt") -> Path``: a private copy of a sample checkpoint, free to damage."""
    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(sample / name, dst)
        return dst
    return make


def _engines_conftest():
    name = "ucp_tests_engines_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "engines" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while defining
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def deepspeed_ckpt(tmp_path):
    """A ZeRO-2, dp=2, bf16 checkpoint with DeepSpeed's file layout (no DeepSpeed needed)."""
    return _engines_conftest().write_fake_zero(
        tmp_path / "ds", stage=2, dp=2, groups=[[("a.weight", (4, 3)), ("a.bias", (4,))],
                                                [("b.weight", (2, 4))]],
        frozen=[("f.weight", (3,))])


@pytest.fixture
def dcp_ckpt(tmp_path):
    """A torch.distributed.checkpoint directory saved by one process; returns (path, model)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    model = {k: v for k, v in list(gpt2_state(3).items())[:4]}
    path = tmp_path / "dcp"
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": dict(model)}, checkpoint_id=str(path))
    return path, model
