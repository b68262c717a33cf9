"""Two jobs saving into one root at once, and hard-linked snapshots of a root that is then
overwritten (a few of the trials scripts/reliability.py counts)."""

from __future__ import annotations

import pytest

from ._trials_jobs import snapshot_trial, two_writers_trial


@pytest.mark.slow
def test_two_jobs_on_one_root(tmp_path):
    out = two_writers_trial(0, tmp_path)
    assert out.lost == 0 and out.recovered and (out.detected or not out.injected), out.note


@pytest.mark.parametrize("seed", [0, 1])
def test_hard_linked_snapshots_keep_their_bytes(tmp_path, seed):
    out = snapshot_trial(seed, tmp_path)
    assert out.lost == 0 and out.recovered, out.note
