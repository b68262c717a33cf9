"""The DeepSpeed reader's metadata handling under hostile input."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.engines import _deepspeed_reader


def test_overlapping_view_is_refused_before_reading(tmp_path):
    """An expanded (stride-0) view of a 4-byte storage claiming 2^28 elements: 2 KB on disk."""
    tag = tmp_path / "global_step1"
    tag.mkdir()
    (tmp_path / "latest").write_text("global_step1")
    torch.save({"module": {"w": torch.ones(1).expand(2**28), "b": torch.ones(3)}, "buffer_names": [],
                "dp_world_size": 1, "mp_world_size": 1}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ucp.CorruptCheckpointError, match=r"shape \[268435456\] \(strides \[0\].*overlap"):
        with _deepspeed_reader.DeepSpeedCheckpoint(tmp_path) as ckpt:
            ckpt.read("w", "param")
