"""CUDA staging: snapshots go to pinned host memory; needs a GPU (runs on the lent device)."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.native import _save

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_tensors_stage_into_pinned_memory():
    t = torch.randn(1024, 1024, device="cuda")
    staged, fragments, _ = _save._stage({"w": (("w",), t)})
    assert staged["w"].device.type == "cpu" and staged["w"].is_pinned()
    assert torch.equal(staged["w"], t.cpu())
    assert fragments[0].shape == (1024, 1024)


@cuda
def test_in_place_gpu_update_after_save_does_not_leak(tmp_path):
    w = torch.randn(4096, 1024, device="cuda")
    expected = w.cpu()
    handle = ucp.save({"w": w, "b": w[:10].bfloat16()}, tmp_path, step=1)
    w.mul_(-1)  # an optimizer step on the GPU right after save returned
    handle.wait()
    back = ucp.load(str(tmp_path))
    assert torch.equal(back["w"], expected)
    assert torch.equal(back["b"], expected[:10].bfloat16())
