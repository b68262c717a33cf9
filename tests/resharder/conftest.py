"""Shared checkpoints: a Megatron-style Llama saved on tp=2 x pp=2 ranks, and its universal form."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def load_helper(name: str):
    """A helper module of this folder (tests run in importlib mode, so not importable by name)."""
    spec = importlib.util.spec_from_file_location(f"ucp_tests_resharder_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """(URL of the native tp2 x pp2 save, URL of its universal checkpoint), step 7."""
    import ucp
    from ucp.grammar import bundled_spec
    from ucp.testing import run_ranks

    ref = load_helper("_ref")
    root = tmp_path_factory.mktemp("llama")
    run_ranks(ref.save_megatron_rank, 4, args=(str(root / "native"),))
    spec = bundled_spec("llama_megatron", constants=ref.C)
    universal = ucp.convert(str(root / "native"), str(root / "universal"), spec=spec)
    assert universal.names() == ref.names()
    return str(root / "native"), str(root / "universal")
