"""Per-rank asynchronous save with an atomic, coordinated commit.

``save`` stages a snapshot copy of every tensor on the calling thread and returns; one
background worker per process writes the rank's files, then all ranks meet on ucp's own gloo
group, and rank 0 (the coordinator) writes ``manifest.json`` only when every rank succeeded.
"""

from __future__ import annotations

import atexit
import concurrent.futures as cf
import dataclasses
import logging
import queue
import threading
import time
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch

from ucp.storage import Storage, checksum

from ucp.resharder import _dtensor
from ucp.core import _stfile
from ucp.core._fingerprint import ALGORITHM, fingerprint, fingerprint_box, to_hex
from ucp.native._catalog import (Representative, group_ranks, layout_digest, member_doc, representative,
                                 tree_digest)
from ucp.native._claim import claim_step, holds_claim, job_id, lease, release_claim
from ucp.core._coord import Coordinator, dist_rank_and_world, get_coordinator
from ucp.core._errors import CheckpointExistsError, SaveError, StateError, UcpError
from ucp.native._faults import failpoint
from ucp.native._layout import MANIFEST, apply_retention, write_latest
from ucp.native._meta import (MAX_JSON_BYTES, CatalogGroup, FileRecord, Manifest, MeshInfo, RankIndex,
                              TensorFragment, block_checksums, block_size, dumps, loads, rank_stem, step_dir)
from ucp.core._topology import Topology
from ucp.core._tree import flatten

__all__ = ["save", "SaveHandle"]

log = logging.getLogger("ucp")
#: How long the interpreter waits at exit for saves still in flight.
_EXIT_WAIT_S = 600.0


class SaveHandle:
    """The pending result of one :func:`save` on this rank.

    ``wait()`` returns once the step is committed on every rank, or raises the
    :class:`~ucp.SaveError` every rank sees when any rank failed.
    """

    def __init__(self, future: cf.Future[None], *, step: int, url: str) -> None:
        self._future, self.step, self.url = future, step, url

    def done(self) -> bool:
        """Whether the save finished (committed or failed); never blocks."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until the save is committed.

        Raises:
            SaveError: the save failed on some rank (named in the message); nothing committed.
            TimeoutError: ``timeout`` seconds passed first (the save goes on).
        """
        # Not result(timeout): CoordinationTimeoutError is a TimeoutError too, and must surface.
        done, _ = cf.wait([self._future], timeout)
        if not done:
            raise TimeoutError(f"save of step {self.step} to {self.url} still running after "
                               f"{timeout}s")
        self._future.result()

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle(step={self.step}, url={self.url!r}, {state})"


@dataclasses.dataclass
class _Job:
    storage: Storage
    coord: Coordinator
    step: int
    rank: int
    world_size: int
    tree: Any
    staged: dict[str, torch.Tensor]
    fragments: list[TensorFragment]
    meshes: list[MeshInfo]
    topology: Topology | None
    spec: str | None
    keep: int | None
    overwrite: bool
    job: str | None = None  # rank 0's job id, learnt when the step is claimed
    like: Representative | None = None  # the rank whose index describes this one's
    future: cf.Future[None] = dataclasses.field(default_factory=cf.Future)


def save(state: Mapping[str, Any], url: str, *, step: int, keep: int | None = None,
         overwrite: bool = False, topology: Topology | str | None = None, spec: str | None = None,
         storage_options: Mapping[str, Any] | None = None, timeout: float = 600.0) -> SaveHandle:
    """Saves this rank's ``state`` as step ``step`` under ``url``, asynchronously.

    Called by every rank of the job (or by a single process without torch.distributed). Returns
    once every tensor is copied to host memory; later in-place changes cannot reach the files.

    Args:
        state: nested dict of tensors (plain or DTensor), numbers, strings, lists and dicts.
        url: checkpoint root: a local path or an fsspec URL such as ``s3://bucket/run``.
        step: the training step; the files go to ``step-NNNNNNNN/``.
        keep: after committing, keep only the ``keep`` newest committed steps.
        overwrite: replace an already committed ``step`` instead of raising.
        topology: the job's parallel layout, recorded in the manifest for conversion.
        spec: UCL text describing the layout, recorded in the manifest.
        storage_options: fsspec options (credentials, endpoint).
        timeout: seconds any rank may wait for the others while committing.

    Returns:
        A :class:`SaveHandle`; ``wait()`` it before relying on the checkpoint. Its ``wait()``
        raises :class:`~ucp.SaveError` when any rank failed, or when another job sharing the
        root is writing or has committed the step (the message names that job).

    Raises:
        StateError: a value cannot be saved (names its key path); raised before any I/O.
        CheckpointExistsError: ``step`` is committed and ``overwrite`` is False.

    Example:
        >>> h = ucp.save({"model": model.state_dict(), "step": 10}, "/ckpt", step=10)
        >>> h.wait()
    """
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**8:
        raise StateError(f"step={step!r} must be an integer in [0, 10**8)")
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise StateError(f"keep={keep!r} must be a positive integer or None")
    topo = Topology.parse(topology) if isinstance(topology, str) else topology
    tree, tensors = flatten(state)
    rank, world = dist_rank_and_world()
    if rank == 0:
        _warn_unnamed_optimizer_state(state)
    coord = get_coordinator(timeout)
    storage = Storage(url, storage_options=storage_options)
    if not overwrite and storage.exists(f"{step_dir(step)}/{MANIFEST}"):
        other = _manifest_job(storage, f"{step_dir(step)}/{MANIFEST}")
        by = f" by job {other}" if other and other != job_id() else ""
        raise CheckpointExistsError(f"step {step} is already committed under {url}{by}; pass "
                                    "overwrite=True to replace it, or save another step")
    failpoint("save.staging", rank=rank)
    staged, fragments, meshes = _stage(tensors)
    job = _Job(storage=storage, coord=coord, step=step, rank=rank, world_size=world, tree=tree,
               staged=staged, fragments=fragments, meshes=meshes, topology=topo, spec=spec,
               keep=keep, overwrite=overwrite)
    _worker().submit(job)
    return SaveHandle(job.future, step=step, url=url)


def _indexed_optimizer_states(obj: Any, path: str) -> Iterator[str]:
    """Key paths of the optimizer state dicts in ``obj`` whose parameters are integer indices
    (``torch.optim.Optimizer.state_dict()``), not names."""
    if not isinstance(obj, Mapping):
        return
    groups = obj.get("param_groups")
    if isinstance(obj.get("state"), Mapping) and isinstance(groups, (list, tuple)) and any(
            isinstance(g, Mapping) and any(isinstance(p, int) for p in g.get("params", ()))
            for g in groups):
        yield path
        return
    for k, v in obj.items():
        yield from _indexed_optimizer_states(v, f"{path}[{k!r}]")


def _warn_unnamed_optimizer_state(state: Mapping[str, Any]) -> None:
    """Says at save time, with the fix, what ``ucp convert`` would only refuse later."""
    for path in _indexed_optimizer_states(state, "state"):
        warnings.warn(
            f"ucp.save: {path} is an optimizer state_dict keyed by integer indices "
            "(torch.optim.Optimizer.state_dict()); ucp.load reads it back, but `ucp convert`, "
            "`ucp inspect` and resharding need parameter names: save the optimizer state of "
            "torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer) instead "
            "(keyed by parameter names), or use ucp.Checkpointer", UserWarning, stacklevel=3)


def _stage(tensors: Mapping[str, tuple[tuple[Any, ...], torch.Tensor]]
           ) -> tuple[dict[str, torch.Tensor], list[TensorFragment], list[MeshInfo]]:
    """Snapshot copies of every tensor (pinned host memory when CUDA is present)."""
    pin = torch.cuda.is_available()
    staged: dict[str, torch.Tensor] = {}
    fragments: list[TensorFragment] = []
    meshes: list[MeshInfo] = []
    needs_sync = False
    for key, (path, t) in tensors.items():
        where = "state" + "".join(f"[{k!r}]" for k in path)
        placements = mesh_index = None
        if _dtensor.is_dtensor(t):
            local, gshape, offsets, placements, mesh = _dtensor.describe(t, where)
            if mesh not in meshes:
                meshes.append(mesh)
            mesh_index = meshes.index(mesh)
        else:
            local, gshape, offsets = t, tuple(t.shape), (0,) * t.dim()
        local = local.detach()
        if local.is_meta:
            raise StateError(f"{where} is a tensor on the meta device (it has a shape but no data); "
                             "materialize it (e.g. module.to_empty(device=...) and initialise it) "
                             "before saving")
        dtype = _stfile.dtype_name(local.dtype)
        buf = torch.empty(local.shape, dtype=local.dtype, pin_memory=pin and local.is_cuda)
        buf.copy_(local, non_blocking=local.is_cuda)
        needs_sync |= local.is_cuda
        staged[key] = buf
        fragments.append(TensorFragment(key=key, dtype=dtype, shape=tuple(local.shape),
                                        global_shape=gshape, offsets=offsets,
                                        placements=placements, mesh=mesh_index))
    if needs_sync:
        torch.cuda.synchronize()
    return staged, fragments, meshes


class _Worker:
    """One background thread per process; saves run one at a time, in submission order."""

    def __init__(self) -> None:
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._pending: set[cf.Future[None]] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="ucp-save", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._lock:
            self._pending.add(job.future)
        job.future.add_done_callback(self._forget)
        self._queue.put(job)

    def _forget(self, fut: cf.Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def pending(self) -> list[cf.Future[None]]:
        with self._lock:
            return list(self._pending)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                _run(job)
            except BaseException as e:  # noqa: BLE001 - delivered to the handle
                job.future.set_exception(e)
            else:
                job.future.set_result(None)
            finally:
                job.staged.clear()


_WORKER: _Worker | None = None
_WORKER_LOCK = threading.Lock()


def _worker() -> _Worker:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER


@atexit.register
def _drain_at_exit() -> None:
    """Lets saves still in flight finish when the program ends without waiting for them."""
    if _WORKER is None:
        return
    pending = _WORKER.pending()
    if pending:
        log.warning("ucp: waiting for %d checkpoint save(s) to finish before exit", len(pending))
        cf.wait(pending, timeout=_EXIT_WAIT_S)


def write_rank_files(storage: Storage, *, step: int, rank: int, world_size: int, tree: Any,
                     staged: dict[str, torch.Tensor], fragments: Sequence[TensorFragment],
                     meshes: Sequence[MeshInfo] = (), job: str | None = None,
                     like: Representative | None = None) -> dict[str, dict[str, int]]:
    """Writes ``rank-RRRRR.safetensors`` and ``rank-RRRRR.json`` of ``step``; returns their
    file records (as dicts), for the manifest. Empties ``staged`` once its bytes are written.
    ``job`` (the writing job's id) is recorded in the rank index; ``like``: see
    :func:`write_rank_index`.

    Called by each rank's save worker, or by one process writing many ranks (``ucp.reshard``).
    """
    sd, stem = step_dir(step), rank_stem(rank)
    fragments = tuple(_checksummed(f, staged[f.key]) for f in fragments)
    data = storage.write(f"{sd}/{stem}.safetensors",
                         _stfile.encode(staged, {"format": "pt", "ucp.step": str(step)}))
    staged.clear()
    failpoint("save.index", rank=rank)
    index = write_rank_index(storage, step=step, rank=rank, world_size=world_size, tree=tree,
                             fragments=fragments, data=data, meshes=meshes, job=job, like=like)
    return {f"{stem}.safetensors": data.to_dict(), f"{stem}.json": index.to_dict()}


def write_rank_index(storage: Storage, *, step: int, rank: int, world_size: int, tree: Any,
                     fragments: Sequence[TensorFragment], data: FileRecord,
                     meshes: Sequence[MeshInfo] = (), job: str | None = None,
                     like: Representative | None = None) -> FileRecord:
    """Writes ``rank-RRRRR.json`` of ``step`` (fragments checksummed, ``data`` the record of the
    rank's written data file) and returns its file record. With ``like`` naming another rank
    of the same layout, the index records only what differs from that rank's (a member index,
    ``ucp.native._catalog.member_doc``): every rank's index whole would make the committed
    metadata of large jobs grow with ranks x tensors.

    Called by each rank after its data file is written; metadata only, so
    ``benchmarks/scale.py`` drives it for thousands of simulated ranks.
    """
    index = RankIndex(rank=rank, world_size=world_size, step=step, tree=tree,
                      fragments=tuple(fragments), data=data, meshes=tuple(meshes), job=job)
    doc = member_doc(index, like) if like is not None and like.rank != rank else index
    return storage.write(f"{step_dir(step)}/{rank_stem(rank)}.json", dumps(doc, indent=None))


def _checksummed(frag: TensorFragment, tensor: torch.Tensor) -> TensorFragment:
    """``frag`` with the checksum of its bytes, of each block of them (partial reads), and the
    partial fingerprint of its values at its region (:mod:`ucp.core._fingerprint`)."""
    data = _stfile.tensor_bytes(tensor)
    return dataclasses.replace(frag, crc32c=checksum([data])[0], block_crc32c=block_checksums(data),
                               block_bytes=block_size(data.nbytes), fingerprint=_fingerprint(frag, tensor))


def _fingerprint(frag: TensorFragment, tensor: torch.Tensor) -> str | None:
    if tuple(tensor.shape) != tuple(frag.shape):  # not the region it claims: left to the readers' checks
        return None
    try:
        value = fingerprint_box(tensor, frag.offsets, frag.global_shape) if tensor.dim() else fingerprint(tensor)
    except TypeError:  # a dtype with no fingerprint (complex)
        return None
    return f"{ALGORITHM}:{to_hex(value)}"


def write_manifest(storage: Storage, *, step: int, world_size: int, topology: Topology | None,
                   spec: str | None, files: Mapping[str, FileRecord],
                   meshes: Sequence[MeshInfo] = (), job: str | None = None,
                   catalog: tuple[CatalogGroup, ...] | None = None) -> None:
    """Commits ``step``: writes its manifest (create-if-absent: of two writers, one commits),
    then ``latest``. Called by one process, after every rank's files are written. ``catalog``
    groups the ranks by layout (``ucp.native._catalog``; None: readers read every rank index).

    Raises:
        SaveError: the step was committed meanwhile by another writer (names its job).
    """
    manifest = Manifest(step=step, world_size=world_size, topology=topology, files=dict(files),
                        created=time.time(), spec=spec, meshes=tuple(meshes), job=job, catalog=catalog)
    rel = f"{step_dir(step)}/{MANIFEST}"
    try:
        storage.write(rel, dumps(manifest, indent=None), exclusive=True)
    except CheckpointExistsError as e:
        other = _manifest_job(storage, rel)
        if job is None or other != job:  # not a retried put of our own manifest
            raise SaveError(f"step {step} under {storage.url} was committed meanwhile by another "
                            f"writer (job {other or 'unknown'}); two jobs are saving to one root: "
                            "give each job its own URL") from e
    try:
        write_latest(storage, step)
    except Exception as e:  # noqa: BLE001 - the step is committed: readers trust manifests, not `latest`
        log.warning("ucp: step %d is committed, but updating %s/latest failed: %s", step, storage.url, e)


def _manifest_job(storage: Storage, rel: str) -> str | None:
    try:
        return loads(storage.read(rel, max_bytes=MAX_JSON_BYTES), what=rel).get("job")
    except Exception:  # noqa: BLE001 - only used to name the other writer
        return None


def _run(job: _Job) -> None:
    layout = layout_digest(job.tree, job.fragments, job.meshes)
    mine = {"began": _begin(job) if job.rank == 0 else None, "layout": layout,
            "tree": tree_digest(job.tree)}
    # one exchange: rank 0's claim, and every rank's layout (which rank's index describes it)
    every = job.coord.all_gather_json(mine, what=f"claiming step {job.step} (by rank 0)")
    began, job.like = every[0]["began"], representative(every, job.rank)
    if began["error"]:
        raise SaveError(f"step {job.step} was not saved to {job.storage.url}: {began['error']}")
    job.job = began["job"]
    with lease(job.storage, job.step, job=job.job, active=job.rank == 0):
        _write_and_commit(job)
    if job.rank == 0:
        release_claim(job.storage, job.step, job=job.job)


def _begin(job: _Job) -> dict[str, Any]:
    """Coordinator only: claims the step for this job (and, to overwrite it, uncommits it)
    before any rank writes a file."""
    me = job_id()
    try:
        claim_step(job.storage, job.step, job=me, overwrite=job.overwrite)
        if job.overwrite:
            job.storage.delete(f"{step_dir(job.step)}/{MANIFEST}")
    except Exception as e:  # noqa: BLE001 - broadcast to every rank, named like a rank's failure
        return {"job": me, "error": f"rank 0: {type(e).__name__}: {e}"}
    return {"job": me, "error": None}


def _write_and_commit(job: _Job) -> None:
    error, files = None, {}
    try:
        failpoint("save.write", rank=job.rank)
        files = write_rank_files(job.storage, step=job.step, rank=job.rank,
                                 world_size=job.world_size, tree=job.tree, staged=job.staged,
                                 fragments=job.fragments, meshes=job.meshes, job=job.job,
                                 like=job.like)
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        error = f"{type(e).__name__}: {e}"
        log.error("ucp: rank %d failed writing step %d: %s", job.rank, job.step, error)
    failpoint("save.gather", rank=job.rank)
    statuses = _gather(job, {"rank": job.rank, "error": error, "files": files,
                             # a member's meshes are its representative's (same layout digest)
                             "meshes": [m.to_dict() for m in job.meshes] if _represents(job) else [],
                             "layout": job.like.layout if job.like else None})
    failed = [s for s in statuses if s["error"]]
    if failed:
        detail = "; ".join(f"rank {s['rank']}: {s['error']}" for s in failed)
        if job.rank == 0:
            _discard(job)
        raise SaveError(f"step {job.step} was not committed to {job.storage.url}: {detail}")
    outcome = _commit(job, statuses) if job.rank == 0 else None
    outcome = job.coord.broadcast_json(outcome, what=f"commit of step {job.step} by rank 0 "
                                       "(the step may or may not be committed)")
    if outcome:
        raise SaveError(f"rank 0 could not commit step {job.step} to {job.storage.url}: {outcome}")


def _represents(job: _Job) -> bool:
    """Whether this rank's index is whole (it is the lowest rank of its layout, or no layout
    was exchanged)."""
    return job.like is None or job.like.rank == job.rank


def _gather(job: _Job, status: dict[str, Any]) -> list[dict[str, Any]]:
    return job.coord.all_gather_json(status, what=f"step {job.step} was not committed")


def _commit(job: _Job, statuses: list[dict[str, Any]]) -> str | None:
    """Coordinator only: writes the manifest (the commit), then ``latest``, then retention."""
    try:
        failpoint("save.commit", rank=job.rank)
        if not holds_claim(job.storage, job.step, job.job):
            raise SaveError(f"another job took step {job.step} over while this save was writing "
                            "it (was this job paused for longer than the lease?); nothing committed")
        commit_statuses(job.storage, statuses, step=job.step, world_size=job.world_size,
                        topology=job.topology, spec=job.spec, job=job.job)
    except Exception as e:  # noqa: BLE001 - broadcast to every rank
        _discard(job)
        return str(e) if isinstance(e, UcpError) else f"{type(e).__name__}: {e}"
    if job.keep is not None:
        try:
            apply_retention(job.storage, keep=job.keep, newest=job.step)
        except Exception as e:  # noqa: BLE001 - the new step is committed; old ones stay
            log.warning("ucp: retention after step %d failed (older steps kept): %s", job.step, e)
    return None


def commit_statuses(storage: Storage, statuses: Sequence[Mapping[str, Any]], *, step: int,
                    world_size: int, topology: Topology | None, spec: str | None,
                    job: str | None) -> None:
    """Commits ``step`` from every rank's gathered status (file records, meshes, layout digest).

    Called by the coordinator only, once every rank reported success; metadata only, so
    ``benchmarks/scale.py`` drives it with the statuses of thousands of simulated ranks.
    """
    files = {name: FileRecord.from_dict(rec) for s in statuses for name, rec in s["files"].items()}
    meshes: dict[MeshInfo, None] = {}  # an insertion-ordered set: every rank of a mesh sends it
    for s in statuses:
        for m in s["meshes"]:
            meshes.setdefault(MeshInfo.from_dict(m), None)
    groups = group_ranks(statuses)
    catalog = None if groups is None else tuple(CatalogGroup.from_dict(g) for g in groups)
    write_manifest(storage, step=step, world_size=world_size, topology=topology, spec=spec,
                   files=files, meshes=list(meshes), job=job, catalog=catalog)


def _discard(job: _Job) -> None:
    """Coordinator only, once every rank has stopped writing a step that is not committed:
    removes the step's files, so a save that failed on a full disk does not keep the space the
    next save needs. Only while this job holds the step's claim: the files are then this job's,
    never those of another job writing the same step. Best effort."""
    sd = step_dir(job.step)
    try:
        # an ambiguous manifest write may have landed
        if holds_claim(job.storage, job.step, job.job) and not job.storage.exists(f"{sd}/{MANIFEST}"):
            job.storage.delete(sd, recursive=True)
    except Exception as e:  # noqa: BLE001 - the save's own error is the one to report
        log.warning("ucp: could not remove the files of uncommitted step %d: %s", job.step, e)

