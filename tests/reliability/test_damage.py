"""Bit flips, truncation and deletion in every file type ucp writes: shards, rank indexes,
manifests, the universal group metadata, zarr array metadata and chunks. Every damage is
detected with an error naming the file, or is harmless (everything reads back identical);
nothing reads back different data, and nothing crashes with a non-ucp error."""

from __future__ import annotations

import pytest
import torch

import ucp

from ._trials import damage_trials

KINDS = {"shard", "rank index", "manifest", "latest", "universal metadata", "array metadata", "zarr chunk"}


def _check(stats):
    assert KINDS <= set(stats), sorted(stats)
    for kind, row in stats.items():
        assert row["silent"] == 0 and row["crash"] == 0 and row["unnamed"] == 0, (kind, row)
        if kind in ("latest", "zarr group"):  # not read by loaders: `latest` is informational
            assert row["harmless"] == row["trials"], (kind, row)
        else:
            assert row["named"] >= 0.9 * row["trials"], (kind, row)


def test_damage_in_every_file_type(tmp_path):
    _check(damage_trials(tmp_path, flips=16, truncations=2, seed=1))


@pytest.mark.slow
def test_damage_sweep(tmp_path):
    _check(damage_trials(tmp_path, flips=400, truncations=20, seed=2))


def test_missing_shard_of_a_committed_step_is_named(tmp_path):
    ucp.save({"w": torch.ones(3)}, str(tmp_path), step=1).wait()
    shard = tmp_path / "step-00000001" / "rank-00000.safetensors"
    shard.unlink()
    with pytest.raises(ucp.CorruptCheckpointError, match=f"{shard} is missing, but the manifest"):
        ucp.load(str(tmp_path))
