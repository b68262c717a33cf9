"""Load one rank's state of a committed native checkpoint, bit for bit."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ucp.storage import Storage

from ucp.resharder import _dtensor
from ucp.core import _stfile
from ucp.core._coord import dist_rank_and_world
from ucp.core._errors import CorruptCheckpointError, TopologyError
from ucp.native._layout import newest_step, read_manifest
from ucp.native._catalog import index_from_doc
from ucp.native._meta import MAX_JSON_BYTES, Manifest, RankIndex, loads, rank_stem, step_dir
from ucp.core._tree import flatten, unflatten

__all__ = ["load", "read_rank_index"]


def load(url: str, *, step: int | None = None, rank: int | None = None, like: Any = None,
         storage_options: Mapping[str, Any] | None = None) -> Any:
    """Returns this rank's saved state from a committed step, reading only this rank's files.

    Called by each rank independently (no collective), except that rebuilding DTensors without
    ``like`` creates their DeviceMeshes, which every rank must then do in the same order.

    Args:
        url: checkpoint root given to :func:`ucp.save`.
        step: the step to load; ``None`` for the newest committed one.
        rank: whose state to read; defaults to this process's rank. Reading another rank's
            state (e.g. in a single inspection process) needs no torch.distributed, unless it
            holds DTensors (TopologyError then: ucp.convert / ucp.open read those anywhere).
        like: a state with the same structure whose DTensors supply the meshes to rebuild
            DTensors on (otherwise the saved meshes are rebuilt).
        storage_options: fsspec options (credentials, endpoint).

    Returns:
        The same nested structure that was saved; tensors equal bit for bit.

    Raises:
        CheckpointNotFoundError: nothing committed (or not ``step``).
        TopologyError: the job's world size differs from the saving job's; use
            ``ucp.Checkpointer.resume`` or ``ucp.reshard`` to change topology.
        ChecksumError: a file differs from its manifest record (names the file).
    """
    storage = Storage(url, storage_options=storage_options)
    step = newest_step(storage) if step is None else step
    manifest = read_manifest(storage, step)
    if rank is None:
        rank, world = dist_rank_and_world()
        if world != manifest.world_size:
            raise TopologyError(f"step {step} under {url} was saved by {manifest.world_size} ranks, "
                                f"but this job has {world}; reshard it (ucp.reshard or "
                                "ucp.Checkpointer.resume), or pass rank= to read one rank's state")
    if not 0 <= rank < manifest.world_size:
        raise TopologyError(f"rank {rank} is outside the {manifest.world_size} ranks that saved "
                            f"step {step} under {url}")
    index = read_rank_index(storage, manifest, rank)
    data_name = f"{step_dir(step)}/{rank_stem(rank)}.safetensors"
    data = _read_listed(storage, manifest, data_name, mutable=True)
    tensors = _stfile.decode(data, where=f"{url}/{data_name}")
    templates = flatten(like)[1] if like is not None else {}
    built = {f.key: _rebuild(f, tensors, index, templates, where=f"{url}/{data_name}")
             for f in index.fragments}

    def tensor_for(key: str) -> Any:
        if key not in built:
            raise CorruptCheckpointError(f"{url}/{data_name}: tensor {key!r} is in the state "
                                         "structure but not in the fragment table")
        return built[key]

    return unflatten(index.tree, tensor_for)


def read_rank_index(storage: Storage, manifest: Manifest, rank: int,
                    rep: Callable[[int], RankIndex] | None = None, *, whole: bool = False) -> RankIndex:
    """The verified ``rank-RRRRR.json`` of ``rank`` in a committed step, whole: a version 2
    index that describes the rank by its group's representative is completed from that rank's
    index (``rep`` reads it, e.g. from a reader's cache; by default it is read here).

    Raises:
        CorruptCheckpointError: ``whole`` and the index describes its rank by another's (a
            representative's index is always whole: chains are refused, not followed).
    """
    name = f"{step_dir(manifest.step)}/{rank_stem(rank)}.json"
    where = f"{storage.url}/{name}"
    doc = loads(_read_listed(storage, manifest, name, max_bytes=MAX_JSON_BYTES), what=where)
    if whole and "like" in doc:
        raise CorruptCheckpointError(f"{where}: the index of a representative rank describes it by "
                                     f"rank {doc['like']}'s index; the step is damaged")
    return index_from_doc(doc, what=where,
                          rep=rep or (lambda r: read_rank_index(storage, manifest, r, whole=True)))


def _read_listed(storage: Storage, manifest: Manifest, name: str, **kwargs: Any) -> bytes | bytearray:
    """A file the manifest lists, verified; a missing one is a damaged step (named), not a bare
    FileNotFoundError."""
    try:
        return storage.read(name, record=_record(manifest, name), **kwargs)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{storage.url}/{name} is missing, but the manifest of step "
                                     f"{manifest.step} lists it; restore it or load another step") from e


def _record(manifest: Manifest, name: str) -> Any:
    rel = name.split("/", 1)[1]
    try:
        return manifest.files[rel]
    except KeyError as e:
        raise CorruptCheckpointError(f"manifest of step {manifest.step} does not list {rel!r}; "
                                     "the step was written by an incompatible tool") from e


def _rebuild(f: Any, tensors: Mapping[str, torch.Tensor], index: RankIndex,
             templates: Mapping[str, Any], *, where: str) -> Any:
    t = tensors.get(f.key)
    if t is None or tuple(t.shape) != f.shape or _stfile.dtype_name(t.dtype) != f.dtype:
        raise CorruptCheckpointError(f"{where}: tensor {f.key!r} is missing or differs from its "
                                     f"fragment record ({f.dtype}{list(f.shape)})")
    if f.placements is None:
        return t
    placements = _dtensor.placements_from_str(f.placements, where)
    template = templates.get(f.key, (None, None))[1]
    if _dtensor.is_dtensor(template):
        mesh = template.device_mesh
    else:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise TopologyError(f"{where}: {f.key!r} is a DTensor; rebuilding it needs "
                                "torch.distributed initialized as in the saving job (or like= holding "
                                "DTensors); read it in one process with ucp.convert / ucp.open")
        try:
            mesh = _dtensor.build_mesh(index.meshes[f.mesh])
        except (RuntimeError, ValueError) as e:  # torch's own errors for a mesh this job cannot have
            raise TopologyError(f"{where}: cannot rebuild the DeviceMesh of {f.key!r} "
                                f"({str(e).splitlines()[0]}); load it from the saving job's ranks") from e
    try:
        return _dtensor.to_dtensor(t, mesh, placements, f.global_shape)
    except (RuntimeError, ValueError, IndexError) as e:
        raise CorruptCheckpointError(f"{where}: {f.key!r} does not fit its DTensor record "
                                     f"({str(e).splitlines()[0]})") from e
