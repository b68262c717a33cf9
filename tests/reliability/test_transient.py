"""Transient storage errors (an fsspec filesystem failing a share of its calls): retried within
the bound, and a failure past the bound surfaces on every rank, naming the rank."""

from __future__ import annotations

import os

import pytest
import torch

import ucp
from ucp import testing_faults as tf
from ucp.native._layout import committed_steps
from ucp.storage import RetryPolicy, Storage


@pytest.fixture(autouse=True)
def _flaky():
    tf.install()


def _state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {"model": {"w": torch.randn(256, 16, generator=g), "b": torch.randn(16, generator=g).bfloat16()},
            "step": step}


def test_save_load_retention_through_a_flaky_store(tmp_path):
    url, opts = tf.flaky_url(tmp_path), {"fail_rate": 0.3, "seed": 7}
    tf.injected_counts(reset=True)
    for step in range(1, 5):
        ucp.save(_state(0, step), url, step=step, keep=2, storage_options=opts).wait()
    back = ucp.load(url, storage_options=opts)
    assert back["step"] == 4 and torch.equal(back["model"]["w"], _state(0, 4)["model"]["w"])
    assert committed_steps(Storage(str(tmp_path))) == [3, 4]
    counts = tf.injected_counts()
    assert counts["faults"] >= 10 and counts["after_effect"] >= 1, counts


def test_convert_and_universal_reads_through_a_flaky_store(tmp_path):
    """zarr's reads go through ucp's retries too (they used to fail on the first error)."""
    opts = {"fail_rate": 0.3, "seed": 3}
    ucp.save(_state(0, 1), str(tmp_path / "n"), step=1).wait()
    ucp.convert(tf.flaky_url(tmp_path / "n"), tf.flaky_url(tmp_path / "u"), storage_options=opts,
                dst_storage_options=opts, progress=False)
    ckpt = ucp.open(tf.flaky_url(tmp_path / "u"), storage_options=opts)
    for _ in range(3):
        assert torch.equal(ckpt.read("w"), _state(0, 1)["model"]["w"])
        assert torch.equal(ckpt.read("b", "param"), _state(0, 1)["model"]["b"])


def test_a_dead_store_is_a_storage_error_not_corruption(tmp_path):
    ucp.save(_state(0, 1), str(tmp_path / "n"), step=1).wait()
    ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"), progress=False)
    url = tf.flaky_url(tmp_path / "u")
    ckpt = ucp.open(url, storage_options={"fail_rate": 0.0})
    ckpt.storage.retry = RetryPolicy(attempts=3, base_delay=0.01)
    ckpt.storage.fs.fail_rate = 1.0  # the store goes away after open
    ckpt._store = ucp.universal._zarr.zarr_store(ckpt.storage, read_only=True)
    with pytest.raises(ucp.StorageError, match="failed after 3 attempts"):
        ckpt.read("w")


# -- several ranks ----------------------------------------------------------------------------

def save_flaky(rank, world, root, fail_rate, steps):
    tf.install()
    opts = {"fail_rate": fail_rate, "seed": 1000 + rank}
    url = tf.flaky_url(root)
    done = []
    try:
        for step in steps:
            ucp.save(_state(rank, step), url, step=step, storage_options=opts, timeout=60).wait()
            done.append(step)
    except ucp.SaveError as e:
        return {"done": done, "error": str(e)}
    back = ucp.load(url, storage_options=opts)
    return {"done": done, "error": None, "ok": torch.equal(back["model"]["w"], _state(rank, steps[-1])["model"]["w"])}


def test_ranks_recover_within_the_bound(run_ranks, tmp_path):
    results = run_ranks(save_flaky, 2, args=(str(tmp_path), 0.25, [1, 2, 3]), timeout=120)
    assert [r.value for r in results] == [{"done": [1, 2, 3], "error": None, "ok": True}] * 2


def test_failure_past_the_bound_surfaces_on_every_rank(run_ranks, tmp_path):
    """Rank 1's store fails every write: each rank's error names rank 1 and the exhausted retries."""
    results = run_ranks(save_flaky, 2, args=(str(tmp_path), 0.0, [1]), timeout=120)
    assert all(r.value["done"] == [1] for r in results)
    results = run_ranks(save_flaky_rank1_dead, 2, args=(str(tmp_path),), timeout=120)
    for r in results:
        assert r.value["done"] == [], r.value
        assert "step 2 was not committed" in r.value["error"] and "rank 1: StorageError" in r.value["error"]
        assert "after 5 attempts" in r.value["error"] and "injected" in r.value["error"]
    assert committed_steps(Storage(str(tmp_path))) == [1]
    assert not os.path.exists(tmp_path / "step-00000002" / "manifest.json")


def save_flaky_rank1_dead(rank, world, root):
    tf.install()
    opts = {"fail_rate": 1.0 if rank == 1 else 0.0, "ops": ["pipe_file"], "seed": rank}
    try:
        ucp.save(_state(rank, 2), tf.flaky_url(root), step=2, storage_options=opts, timeout=60).wait()
    except ucp.SaveError as e:
        return {"done": [], "error": str(e)}
    return {"done": [2], "error": None}


def test_an_unreachable_server_when_opening_is_a_storage_error():
    """ftp (like sftp) connects while the filesystem is made; that failed with a bare OSError."""
    with pytest.raises(ucp.StorageError, match=r"opening ftp://127.0.0.1:9/x failed after 5 attempts"):
        Storage("ftp://127.0.0.1:9/x")


def test_exhausted_retries_are_not_reported_as_a_missing_file(tmp_path):
    """The native engine's file check took any OSError (a StorageError is one) for a missing file."""
    ucp.save(_state(0, 1), str(tmp_path / "n"), step=1).wait()
    opts = {"fail_rate": 1.0, "ops": ["info"]}
    with pytest.raises(ucp.StorageError, match=r"sizing .*rank-00000.json failed after 5 attempts"):
        ucp.convert(tf.flaky_url(tmp_path / "n"), str(tmp_path / "u"), storage_options=opts, progress=False)
