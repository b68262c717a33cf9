"""Two jobs on one root: a step is claimed before it is written, committed at most once, and
neither cleanup nor retention touches another job's files."""

from __future__ import annotations

import json
import time

import pytest
import torch

import ucp
from ucp.native import _claim, _save
from ucp.native._layout import read_manifest
from ucp.native._meta import Manifest, dumps, loads
from ucp.storage import Storage


def _foreign_claim(root, step: int, *, job: str = "other-host-4242-cafe", age: float = 0.0) -> None:
    """Another job's claim on ``step``, last renewed ``age`` seconds ago."""
    Storage(str(root)).write(f"step-{step:08d}/claim.json",
                             dumps(_claim.Claim(job=job, renewed=time.time() - age)))


def test_second_writer_of_a_step_is_refused_naming_the_other_job(tmp_path):
    _foreign_claim(tmp_path, 5)
    theirs = tmp_path / "step-00000005" / "rank-00000.safetensors"
    theirs.write_bytes(b"the other job's half-written shard")
    with pytest.raises(ucp.SaveError, match="other-host-4242-cafe.*two jobs are saving to one root"):
        ucp.save({"w": torch.ones(3)}, tmp_path, step=5).wait()
    assert theirs.read_bytes() == b"the other job's half-written shard"
    assert not (tmp_path / "step-00000005" / "manifest.json").exists()


def test_a_dead_jobs_expired_claim_is_taken_over(tmp_path):
    _foreign_claim(tmp_path, 5, job="dead-job", age=_claim.LEASE_S + 5)
    ucp.save({"w": torch.ones(3)}, tmp_path, step=5).wait()
    assert torch.equal(ucp.load(str(tmp_path))["w"], torch.ones(3))
    assert not (tmp_path / "step-00000005" / "claim.json").exists()  # dropped after the commit


def _claim_of(root, step: int, proc) -> None:
    """A claim on ``step`` by ``proc`` (a process on this machine), renewed just now."""
    where = {**_claim.this_process(), "pid": proc.pid}
    Storage(str(root)).write(f"step-{step:08d}/claim.json",
                             dumps(_claim.Claim(job=f"local-{proc.pid}", renewed=time.time(), process=where)))


def test_a_claim_whose_process_here_has_exited_is_taken_over_at_once(tmp_path):
    import subprocess
    import sys

    crashed = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed.wait()  # a job that died mid-save on this machine: its claim is fresh, its process gone
    _claim_of(tmp_path, 5, crashed)
    ucp.save({"w": torch.ones(3)}, tmp_path, step=5).wait()
    assert torch.equal(ucp.load(str(tmp_path))["w"], torch.ones(3))


def test_a_claim_whose_process_here_still_runs_is_respected(tmp_path):
    import subprocess
    import sys

    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _claim_of(tmp_path, 5, running)
        with pytest.raises(ucp.SaveError, match=f"local-{running.pid}.*two jobs are saving to one root"):
            ucp.save({"w": torch.ones(3)}, tmp_path, step=5).wait()
    finally:
        running.kill()
        running.wait()


def test_job_id_in_manifest_and_every_rank_index(tmp_path):
    ucp.save({"w": torch.ones(3)}, tmp_path, step=1).wait()
    manifest = read_manifest(Storage(str(tmp_path)), 1)
    index = json.loads((tmp_path / "step-00000001" / "rank-00000.json").read_text())
    assert manifest.job == index["job"] == _claim.job_id() and manifest.job


def test_manifest_without_job_id_still_loads():
    old = {"format_version": 1, "kind": "ucp-manifest", "step": 3, "world_size": 1, "engine": "ucp",
           "created": 1.0, "topology": None, "files": {}, "spec": None, "meshes": []}
    assert Manifest.from_dict(loads(json.dumps(old).encode(), what="old")).job is None


def test_commit_is_exclusive_and_names_the_committed_job(tmp_path):
    storage = Storage(str(tmp_path))
    _save.write_manifest(storage, step=2, world_size=1, topology=None, spec=None, files={}, job="job-a")
    with pytest.raises(ucp.SaveError, match="committed meanwhile by another writer \\(job job-a\\)"):
        _save.write_manifest(storage, step=2, world_size=1, topology=None, spec=None, files={}, job="job-b")
    assert read_manifest(storage, 2).job == "job-a"
    # the same job's retried put (its first answer was lost) is not a conflict
    _save.write_manifest(storage, step=2, world_size=1, topology=None, spec=None, files={}, job="job-a")


def test_commit_is_exclusive_on_s3(s3_url):
    url, opts = s3_url
    storage = Storage(url, storage_options=opts)
    _save.write_manifest(storage, step=2, world_size=1, topology=None, spec=None, files={}, job="job-a")
    with pytest.raises(ucp.SaveError, match="job job-a"):
        _save.write_manifest(storage, step=2, world_size=1, topology=None, spec=None, files={}, job="job-b")
    assert read_manifest(storage, 2).job == "job-a"


def test_retention_deletes_only_committed_steps(tmp_path):
    _foreign_claim(tmp_path, 2)
    theirs = tmp_path / "step-00000002" / "rank-00000.safetensors"
    theirs.write_bytes(b"another job's step in progress")
    for s in (3, 4):
        ucp.save({"s": torch.tensor(s)}, tmp_path, step=s, keep=1).wait()
    assert theirs.read_bytes() == b"another job's step in progress"
    assert not (tmp_path / "step-00000003").exists()


def test_failed_save_leaves_a_step_another_job_took_over(tmp_path, monkeypatch):
    def taken_over_then_fail(storage, *, step, **kw):
        _foreign_claim(tmp_path, step, job="usurper")
        (tmp_path / f"step-{step:08d}" / "rank-00000.json").write_text("usurper's index")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_save, "write_rank_files", taken_over_then_fail)
    with pytest.raises(ucp.SaveError, match="No space left on device"):
        ucp.save({"w": torch.ones(3)}, tmp_path, step=7).wait()
    assert (tmp_path / "step-00000007" / "rank-00000.json").read_text() == "usurper's index"


def test_failed_save_removes_its_own_step(tmp_path, monkeypatch):
    def fail(storage, *, step, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_save, "write_rank_files", fail)
    with pytest.raises(ucp.SaveError):
        ucp.save({"w": torch.ones(3)}, tmp_path, step=7).wait()
    assert not (tmp_path / "step-00000007").exists()
