"""Which job writes a step: a job id per process, and a claim (a lease) on a step directory.

Two jobs can save into one root: a job restarted while the old one still runs, or two launches
with the same URL. Before any rank writes step N, the coordinator creates
``step-NNNNNNNN/claim.json`` if it is absent (a hard link on local disk, a conditional put on
S3), renews it while the save runs and drops it after the commit. Another job that finds a live
claim refuses to touch the step and names the claim's job; a claim not renewed for
:data:`LEASE_S` seconds belongs to a job that died, and is taken over, and so, at once, is a claim
whose process ran on this very machine and has exited (a job restarted where it crashed). The commit itself (``manifest.json``) is create-if-absent too,
so of two jobs at most one commits a step, and cleanup after a failed save deletes a step only
while this job holds its claim.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from ucp.storage import Storage

from ucp.core._errors import CheckpointExistsError, CorruptCheckpointError, SaveError
from ucp.native._meta import dumps, loads, step_dir

__all__ = ["CLAIM", "LEASE_S", "Claim", "job_id", "read_claim", "claim_step", "holds_claim", "release_claim",
           "lease", "this_process", "pid_alive"]

CLAIM = "claim.json"
#: Seconds after its last renewal that a claim is taken to belong to a dead job.
LEASE_S = 120.0
#: A claim is a few dozen bytes; anything much larger is not one.
_MAX_CLAIM_BYTES = 64 * 1024
log = logging.getLogger("ucp")
_JOB_ID: str | None = None
_JOB_LOCK = threading.Lock()


def job_id() -> str:
    """This process's job id (host, pid and a random part); rank 0's is the job's."""
    global _JOB_ID
    with _JOB_LOCK:
        if _JOB_ID is None:
            _JOB_ID = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        return _JOB_ID


def this_process() -> dict[str, Any] | None:
    """Where this process runs, precisely enough to tell later whether it still does: the
    kernel's boot id, the PID namespace and the pid (None where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return {"boot": boot, "pidns": os.readlink("/proc/self/ns/pid"), "pid": os.getpid()}
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # cannot tell: assume it lives
        return True


@dataclasses.dataclass(frozen=True)
class Claim:
    """``claim.json``: the job writing a step, when it last renewed its lease, and where its
    coordinator runs (``process``: see :func:`this_process`)."""

    job: str
    renewed: float
    process: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"format_version": 1, "kind": "ucp-claim", "job": self.job, "renewed": self.renewed}
        return {**d, "process": self.process} if self.process is not None else d

    def gone(self) -> bool:
        """Whether the claiming process ran on this machine (same boot, same PID namespace) and
        has exited: a crashed job's claim, taken over at once instead of after ``LEASE_S``."""
        here, there = this_process(), self.process
        if here is None or not isinstance(there, dict) or type(there.get("pid")) is not int:
            return False
        if (there.get("boot"), there.get("pidns")) != (here["boot"], here["pidns"]):
            return False
        return there["pid"] != here["pid"] and not pid_alive(there["pid"])

    def age(self) -> float:
        return time.time() - self.renewed


def _claim_rel(step: int) -> str:
    return f"{step_dir(step)}/{CLAIM}"


def read_claim(storage: Storage, step: int) -> Claim | None:
    """The claim on ``step``, or None when there is none. A damaged claim reads as an expired
    one of an unknown job (it cannot protect anything)."""
    rel = _claim_rel(step)
    try:
        d = loads(storage.read(rel, max_bytes=_MAX_CLAIM_BYTES), what=f"{storage.url}/{rel}")
        job, renewed = d["job"], d["renewed"]
        if not isinstance(job, str) or not isinstance(renewed, (int, float)):
            raise CorruptCheckpointError(f"{storage.url}/{rel}: bad job or renewal time")
    except FileNotFoundError:
        return None
    except (CorruptCheckpointError, KeyError) as e:
        log.warning("ucp: ignoring the damaged claim %s/%s: %s", storage.url, rel, e)
        return Claim(job="<damaged claim>", renewed=0.0)
    process = d.get("process")
    return Claim(job=job, renewed=float(renewed), process=process if isinstance(process, dict) else None)


def holds_claim(storage: Storage, step: int, job: str) -> bool:
    """Whether ``job`` holds the claim on ``step``."""
    claim = read_claim(storage, step)
    return claim is not None and claim.job == job


def claim_step(storage: Storage, step: int, *, job: str, overwrite: bool) -> None:
    """Claims ``step`` for ``job`` before any of its files are written. Called by the
    coordinator only.

    Raises:
        CheckpointExistsError: the step is committed and ``overwrite`` is False.
        SaveError: another job's claim on the step is live (names that job).
    """
    rel, manifest = _claim_rel(step), f"{step_dir(step)}/manifest.json"
    for _ in range(3):
        try:
            storage.write(rel, dumps(Claim(job, time.time(), this_process())), exclusive=True)
            return
        except CheckpointExistsError:
            pass
        other = read_claim(storage, step)
        if other is None:
            continue  # released meanwhile: try again
        if other.job == job:
            storage.write(rel, dumps(Claim(job, time.time(), this_process())))
            return
        committed = storage.exists(manifest)
        if committed and not overwrite:
            raise CheckpointExistsError(f"step {step} is already committed under {storage.url} "
                                        f"(by job {other.job}); pass overwrite=True to replace it")
        gone = not committed and other.age() < LEASE_S and other.gone()
        if not committed and other.age() < LEASE_S and not gone:
            raise SaveError(_busy(storage, step, other))
        why = ("of a committed step" if committed else "whose process on this machine has exited" if gone
               else f"expired {other.age():.0f}s ago")
        log.warning("ucp: taking over step %d of %s from job %s (claim %s)", step, storage.url, other.job, why)
        storage.delete(rel)
    raise SaveError(f"step {step} under {storage.url}: another job claimed it at the same time; "
                    "two jobs are saving to one root; give each job its own URL")


def release_claim(storage: Storage, step: int, *, job: str) -> None:
    """Drops ``job``'s claim once the step is committed (the manifest then protects it). Best
    effort: a claim left behind only delays another job's overwrite of the step."""
    try:
        if holds_claim(storage, step, job):
            storage.delete(_claim_rel(step))
    except Exception as e:  # noqa: BLE001 - the step is committed
        log.warning("ucp: could not drop the claim on committed step %d: %s", step, e)


def _busy(storage: Storage, step: int, other: Claim) -> str:
    return (f"step {step} under {storage.url} is being written by another job, {other.job} "
            f"(its claim was renewed {other.age():.0f}s ago): two jobs are saving to one root. "
            f"Give each job its own URL, or stop the other job; a claim not renewed for "
            f"{LEASE_S:.0f}s is taken over (or delete {step_dir(step)}/{CLAIM} once that job is dead)")


class lease:  # noqa: N801 - used as a context manager, like a function
    """Renews ``job``'s claim on ``step`` every ``LEASE_S / 4`` seconds while the block runs
    (on the coordinator; other ranks pass ``active=False``)."""

    def __init__(self, storage: Storage, step: int, *, job: str, active: bool) -> None:
        self._storage, self._step, self._job, self._active = storage, step, job, active
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> lease:
        if self._active:
            self._thread = threading.Thread(target=self._renew, name="ucp-lease", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_S / 4):
            try:  # renew only a claim still ours: never overwrite a job that took the step over
                if holds_claim(self._storage, self._step, self._job):
                    self._storage.write(_claim_rel(self._step),
                                        dumps(Claim(self._job, time.time(), this_process())))
            except Exception as e:  # noqa: BLE001 - the commit checks the claim again
                log.warning("ucp: renewing the claim on step %d failed: %s", self._step, e)
