"""DTensor <-> (local tensor, region of the global tensor, placements, mesh) for saving/loading."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ucp.core._coord import on_exit
from ucp.core._errors import CorruptCheckpointError, StateError
from ucp.core._records import MeshInfo

__all__ = ["is_dtensor", "describe", "placement_to_str", "placements_from_str", "mesh_info",
           "build_mesh", "to_dtensor"]

if TYPE_CHECKING:
    from torch.distributed.tensor import Placement


def _td() -> Any:
    """``torch.distributed.tensor``, imported on first use (it costs half a second, and a
    process that never makes a DTensor, e.g. ``ucp convert`` of a DeepSpeed checkpoint, never
    needs it)."""
    import torch.distributed.tensor as td

    return td

_MESHES: dict[MeshInfo, Any] = {}
_MESH_LOCK = threading.Lock()


def is_dtensor(t: Any) -> bool:
    td = sys.modules.get("torch.distributed.tensor")  # no DTensor exists before it is imported
    return td is not None and isinstance(t, td.DTensor)


def placement_to_str(p: Placement, where: str) -> str:
    """``Shard(d)`` -> ``"S(d)"``, ``Replicate()`` -> ``"R"``, ``Partial(op)`` -> ``"P(op)"``."""
    td = _td()
    if type(p) is td.Shard:
        return f"S({p.dim})"
    if type(p) is td.Replicate:
        return "R"
    if type(p) is td.Partial:
        return f"P({p.reduce_op})"
    raise StateError(f"{where}: DTensor placement {p!r} is not supported yet (ucp saves Shard, "
                     "Replicate and Partial); redistribute the tensor before saving")


def placements_from_str(items: Sequence[str], where: str) -> tuple[Placement, ...]:
    out: list[Placement] = []
    for s in items:
        if s == "R":
            out.append(_td().Replicate())
        elif s.startswith("S(") and s.endswith(")") and s[2:-1].isdigit():
            out.append(_td().Shard(int(s[2:-1])))
        elif s.startswith("P(") and s.endswith(")"):
            out.append(_td().Partial(s[2:-1]))
        else:
            raise CorruptCheckpointError(f"{where}: unknown placement {s!r}")
    return tuple(out)


def mesh_info(mesh: Any) -> MeshInfo:
    names = mesh.mesh_dim_names
    return MeshInfo(shape=tuple(mesh.mesh.shape), ranks=tuple(int(r) for r in mesh.mesh.flatten()),
                    dim_names=None if names is None else tuple(names))


def describe(t: Any, where: str) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], tuple[str, ...], MeshInfo]:
    """Local tensor, global shape, global offsets, placements and mesh of a DTensor.

    Raises:
        StateError: for placements whose local shard is not one box of the global tensor.
    """
    placements = tuple(placement_to_str(p, where) for p in t.placements)
    local = t.to_local()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(local.shape):
        raise StateError(f"{where}: DTensor local shape {tuple(local.shape)} differs from the "
                         f"expected {tuple(shape)} for placements {placements}")
    return local, tuple(t.shape), tuple(int(o) for o in offsets), placements, mesh_info(t.device_mesh)


@on_exit
def clear_meshes() -> None:
    """Forgets the cached meshes (and so their process groups)."""
    with _MESH_LOCK:
        _MESHES.clear()


def build_mesh(info: MeshInfo, device_type: str = "cpu") -> Any:
    """A DeviceMesh equal to ``info`` (cached: the same saved mesh maps to one DeviceMesh).

    Collective over the default process group: every rank must call it in the same order.
    """
    from torch.distributed.device_mesh import DeviceMesh

    with _MESH_LOCK:
        mesh = _MESHES.get(info)
        if mesh is None:
            ranks = torch.tensor(info.ranks, dtype=torch.int64).view(info.shape)
            mesh = DeviceMesh(device_type, ranks, mesh_dim_names=info.dim_names)
            _MESHES[info] = mesh
        return mesh


def to_dtensor(local: torch.Tensor, mesh: Any, placements: tuple[Placement, ...],
               global_shape: tuple[int, ...]) -> Any:
    stride = torch.empty(global_shape, device="meta").stride()
    return _td().DTensor.from_local(local, mesh, placements, run_check=False,
                              shape=torch.Size(global_shape), stride=stride)


def is_zero_redundancy(opt: Any) -> bool:
    """Whether ``opt`` is a ``torch.distributed.optim.ZeroRedundancyOptimizer``, without importing
    that package (its import JIT-compiles functional optimizers: most of a second); an optimizer
    of a module never imported cannot be one."""
    module = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return module is not None and isinstance(opt, module.ZeroRedundancyOptimizer)
