"""A full disk (ENOSPC, injected part-way through a file): a clean error, the previous checkpoint
intact, and nothing of the failed step left behind (its files would keep the space the next save
needs). A full disk while only ``latest`` is updated does not fail a committed save."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import ucp
from ucp.native import _claim
from ucp import testing_faults as tf
from ucp.native._layout import committed_steps
from ucp.native._meta import dumps
from ucp.storage import Storage


def _state(rank: int, step: int) -> dict:
    g = torch.Generator().manual_seed(10 * rank + step)
    return {"w": torch.randn(50_000, generator=g), "step": step}


def _leftovers(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                  if ".partial" in f or d.endswith("step-00000002"))


def _sizes(tmp_path) -> dict[str, int]:
    """The files a save of step 2 writes, with their sizes (the claim is dropped at the commit,
    so it is measured apart)."""
    ucp.save(_state(0, 1), str(tmp_path / "probe"), step=1).wait()
    sd = tmp_path / "probe" / "step-00000001"
    claim = len(dumps(_claim.Claim(job=_claim.job_id(), renewed=time.time(),
                                   process=_claim.this_process()))) + 8  # a time may print longer
    return {"claim.json": claim, **{p.name: p.stat().st_size for p in sd.iterdir()}}


@pytest.mark.parametrize("phase", ["shard", "index", "manifest"])
def test_disk_full_mid_write(tmp_path, phase):
    sizes = _sizes(tmp_path)
    claim = sizes["claim.json"]  # written first
    free = {"shard": claim + sizes["rank-00000.safetensors"] // 2,
            "index": claim + sizes["rank-00000.safetensors"] + 100,
            "manifest": claim + sizes["rank-00000.safetensors"] + sizes["rank-00000.json"] + 100}[phase]
    root = tmp_path / "ckpt"
    ucp.save(_state(0, 1), str(root), step=1).wait()
    with tf.disk_full(root, free_bytes=free) as left:
        with pytest.raises(ucp.SaveError, match=r"(step 2 was not committed|could not commit step 2).*No space left on device"):
            ucp.save(_state(0, 2), str(root), step=2).wait()
    assert left[0] == 0  # the disk really filled up, part-way through a file
    assert committed_steps(Storage(str(root))) == [1]
    assert torch.equal(ucp.load(str(root))["w"], _state(0, 1)["w"])
    assert _leftovers(root) == [] and not (root / "step-00000002").exists()
    ucp.save(_state(0, 2), str(root), step=2).wait()  # space is back: the same step saves
    assert ucp.load(str(root))["step"] == 2


def test_disk_full_writing_latest_does_not_fail_a_committed_save(tmp_path, caplog):
    sizes = _sizes(tmp_path)
    root = tmp_path / "ckpt"
    ucp.save(_state(0, 1), str(root), step=1).wait()
    with tf.disk_full(root, free_bytes=sum(sizes.values()) + 2), caplog.at_level(logging.WARNING, "ucp"):
        ucp.save(_state(0, 2), str(root), step=2).wait()
    assert "step 2 is committed, but updating" in caplog.text
    assert (root / "latest").read_text().strip() == "step-00000001"  # readers trust manifests
    assert ucp.load(str(root))["step"] == 2


def fill_disk_on_rank_one(rank, world, root):
    ucp.save(_state(rank, 1), root, step=1).wait()
    free = 10**9 if rank == 0 else 100_000  # rank 1's shard (~200 kB) does not fit
    with tf.disk_full(root, free_bytes=free):
        try:
            ucp.save(_state(rank, 2), root, step=2, timeout=60).wait()
        except ucp.SaveError as e:
            return str(e)
    return "committed"


def test_disk_full_on_one_rank_fails_every_rank_and_cleans_up(run_ranks, tmp_path):
    root = tmp_path / "ckpt"
    results = run_ranks(fill_disk_on_rank_one, 2, args=(str(root),), timeout=120)
    for r in results:
        assert "rank 1: StorageError" in r.value and "No space left on device" in r.value, r.value
    assert committed_steps(Storage(str(root))) == [1]
    for rank in (0, 1):
        assert torch.equal(ucp.load(str(root), rank=rank)["w"], _state(rank, 1)["w"])
    assert _leftovers(root) == [] and not (root / "step-00000002").exists()


# -- a real full filesystem: a 3 MiB tmpfs in a private mount namespace ---------------------------

REAL = """
import os, sys, torch, ucp
from ucp.native._layout import committed_steps
from ucp.native._meta import dumps
from ucp.storage import Storage
root = sys.argv[1]
ucp.save({"w": torch.ones(250_000)}, root, step=1).wait()          # 1 MB of 3 MiB
try:
    ucp.save({"w": torch.full((625_000,), 2.0)}, root, step=2).wait()  # 2.5 MB more
    print("committed")
except ucp.SaveError as e:
    print("error:", "No space left on device" in str(e))
print("steps:", committed_steps(Storage(root)))
print("intact:", bool((ucp.load(root)["w"] == 1).all()))
print("left:", sorted(os.listdir(root)), [f for d, _, fs in os.walk(root) for f in fs if ".partial" in f])
ucp.save({"w": torch.full((250_000,), 3.0)}, root, step=3, keep=1).wait()  # fits again
print("after:", committed_steps(Storage(root)))
"""


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and tmpfs in a user namespace")
def test_real_full_filesystem(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "real.py"
    script.write_text(REAL)
    cmd = f"mount -t tmpfs -o size=3m none {mnt} && exec {sys.executable} {script} {mnt}/ckpt"
    out = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["error: True", "steps: [1]", "intact: True",
                                       "left: ['latest', 'step-00000001'] []", "after: [3]"], out.stdout
