"""A root others can write into: links and copied manifests never make ucp delete or trust
what is not the step's own."""

from __future__ import annotations

import shutil

import pytest
import torch

import ucp


def test_retention_never_follows_a_step_link_out_of_the_root(tmp_path):
    other, root = tmp_path / "other", tmp_path / "root"
    ucp.save({"w": torch.ones(2)}, other, step=1).wait()
    root.mkdir()
    (root / "step-00000000").symlink_to(other / "step-00000001", target_is_directory=True)
    for s in (2, 3):
        ucp.save({"w": torch.full((2,), float(s))}, root, step=s, keep=1).wait()
    assert (other / "step-00000001" / "manifest.json").exists()
    assert torch.equal(ucp.load(str(other))["w"], torch.ones(2))
    assert not (root / "step-00000002").exists()  # retention still works on real steps


def test_a_manifest_is_trusted_only_for_its_own_step(tmp_path):
    ucp.save({"w": torch.ones(2)}, tmp_path, step=1).wait()
    shutil.copytree(tmp_path / "step-00000001", tmp_path / "step-00000009")
    with pytest.raises(ucp.CorruptCheckpointError, match="manifest is of step 1, not of step 9"):
        ucp.load(str(tmp_path), step=9)
