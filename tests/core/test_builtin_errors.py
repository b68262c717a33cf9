"""Failures that used to escape as bare builtin errors are UcpErrors that say what to do."""

from __future__ import annotations

import shutil

import pytest
import torch

import ucp
from ucp.engines._open import open_source


def test_saving_a_meta_tensor_is_a_state_error(tmp_path):
    with pytest.raises(ucp.StateError, match=r"state\['model'\]\['w'\] is a tensor on the meta device"):
        ucp.save({"model": {"w": torch.empty(3, device="meta")}}, tmp_path / "c", step=1)
    assert not (tmp_path / "c").exists()  # refused before any I/O


def test_a_step_deleted_while_converting_is_named(tmp_path):
    ucp.save({"w": torch.ones(3)}, tmp_path / "n", step=1).wait()
    source, _ = open_source(str(tmp_path / "n"))
    shutil.rmtree(tmp_path / "n" / "step-00000001")  # retention of a job still saving
    with pytest.raises(ucp.UcpError, match="rank-00000.safetensors: gone while being read"):
        source.read("w", "fp32")


def test_auto_detect_says_why_deepspeed_refused_a_file(tmp_path):
    (tmp_path / "ds" / "global_step1").mkdir(parents=True)
    (tmp_path / "ds" / "latest").write_text("global_step1")
    (tmp_path / "ds" / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    with pytest.raises(ucp.ConvertError, match="no engine recognises.*deepspeed: .*looks like a "
                                               "DeepSpeed checkpoint, but the DeepSpeed reader refused it: .+"):
        ucp.convert(str(tmp_path / "ds"), str(tmp_path / "u"))
