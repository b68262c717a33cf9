"""torch DCP as a reshard target (``ucp reshard SRC DST --engine dcp``).

Writes a checkpoint that ``torch.distributed.checkpoint.load`` reads into any model layout (FSDP2,
DTensor TP, plain) and ``dcp_to_torch_save`` turns into one file. The state dict is the one
``get_state_dict(model, optimizer)`` gives::

    {"model": {fqn: weight (the fp32 masters where the source has them) or buffer},
     "optim": {"state": {fqn: {"step": 0-d float32, "exp_avg": ..., ...}},
               "param_groups": [{...hyper-parameters..., "params": [fqn, ...]}]}}

A tied weight is stored under both of its names (as the model's state dict has it). Each tensor is
stored whole (one DCP chunk): a DCP checkpoint is read onto any sharding by
``dcp.load`` itself, so the target topology only decides which layouts are refused (checked
before any byte is written). torch's own writer writes the files (``.metadata``, ``__0_0.distcp``);
tensors are read from the source one at a time as the writer asks for them, so memory holds one
tensor, never the model. Written by process 0 (other processes of a torchrun job wait for it).
"""

from __future__ import annotations

import io
import time
from typing import Any, Mapping

import torch

from ucp.core._coord import get_coordinator
from ucp.core._errors import CheckpointExistsError
from ucp.core._topology import Topology
from ucp.grammar import Spec
from ucp.resharder import ArraySource, ReadStats, ReshardReport, check_recorded, plan_ranks, register_target
from ucp.resharder._source import aliases_of
from ucp.storage import Storage, read_counter

__all__ = ["DcpTarget"]

METADATA = ".metadata"
#: Where a per-parameter step comes from when the source records only its own step.
STEP = "#step"


def state_dict_of(source: ArraySource) -> tuple[dict[str, Any], dict[str, tuple[str, str | None]]]:
    """The ``get_state_dict`` layout of ``source`` with meta tensors (shapes and dtypes only),
    and where each flattened tensor key is read from: ``(name, state)`` (state None: a buffer)."""
    model: dict[str, Any] = {}
    states: dict[str, dict[str, Any]] = {}
    where: dict[str, tuple[str, str | None]] = {}
    for name in source.names():
        info = source.info(name)
        masters = "fp32" in info.states  # the fp32 masters are the weights training goes on from
        model[name] = torch.empty(info.shape, dtype=torch.float32 if masters else info.dtype, device="meta")
        where[f"model.{name}"] = (name, "fp32" if masters else "param")
        for state in info.states:
            if state in ("param", "fp32"):
                continue
            shape = () if state == "step" else info.shape
            states.setdefault(name, {})[state] = torch.empty(shape, dtype=torch.float32, device="meta")
            where[f"optim.state.{name}.{state}"] = (name, state)
        if name in states and "step" not in states[name] and source.step is not None:
            # engines that count steps per group (DeepSpeed) record no per-parameter step: torch's
            # optimizers keep one per parameter, the number of steps taken, the source's step
            states[name]["step"] = torch.empty((), dtype=torch.float32, device="meta")
            where[f"optim.state.{name}.step"] = (name, STEP)
    for alias, name in aliases_of(source).items():  # tied weights: the model's state dict has both
        if name in model and alias not in model:
            model[alias] = model[name]
            where[f"model.{alias}"] = where[f"model.{name}"]
    for name in source.buffer_names():
        a = source.array(name, None)
        model[name] = torch.empty(a.shape or (), dtype=a.dtype, device="meta")
        where[f"model.{name}"] = (name, None)
    groups = [dict(g) for g in source.param_groups]
    for g in groups:
        g["params"] = []
    for name in source.names():
        info = source.info(name)
        if info.group is not None and not info.frozen and 0 <= info.group < len(groups):
            groups[info.group]["params"].append(name)
    for g in groups:  # JSON made tuples lists; torch's optimizers keep betas as a tuple
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"model": model, "optim": {"state": states, "param_groups": groups}}, where


def _planner(source: ArraySource, where: Mapping[str, tuple[str, str | None]], dst: str,
             verify: bool, stats: list[int]) -> Any:
    """A DCP save planner whose tensors are read from ``source`` when the writer asks for them."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class _Reading(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> torch.Tensor | io.BytesIO:
            key = write_item.index.fqn
            if key not in where:
                return super().resolve_data(write_item)
            name, state = where[key]
            if state == STEP:
                return torch.tensor(float(source.step))
            t = source.read(name, state, None)
            if state == "step":
                t = t.to(torch.float32).reshape(())
            if verify and state is not None:
                check_recorded(source, name, state, t, f"{dst}/{key}")
            stats[0] += t.numel() * t.element_size()
            return t.contiguous()

    return _Reading()


class DcpTarget:
    """Writes a torch DCP checkpoint (see the module docstring)."""

    name = "dcp"
    default_alignment = 1

    def write(self, source: ArraySource, dst: str, *, topology: Topology, spec: Spec | None,
              alignment: int, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, workers: int,
              progress: bool, verify: bool = False) -> ReshardReport:
        """``verify``: each tensor written must have the fingerprint a universal ``source``
        records for it (states stored in another dtype are not checked)."""
        start = time.perf_counter()
        plan_ranks(source, topology, spec=spec, alignment=alignment)  # refuses bad layouts before I/O
        storage = Storage(dst, storage_options=storage_options)
        coord = get_coordinator(600.0)
        if storage.exists(METADATA) and not overwrite:
            raise CheckpointExistsError(f"{dst} already holds a DCP checkpoint; pass overwrite=True "
                                        "(--overwrite) to replace it")
        coord.all_gather_json(None, what="starting to write the DCP checkpoint")
        written, before = [0], read_counter()
        if coord.rank == 0:
            _save(source, dst, storage, verify=verify, written=written)
        coord.all_gather_json(None, what="writing the DCP checkpoint")
        read = (read_counter() - before).bytes
        stats = ReadStats(bytes_read=read, bytes_needed=written[0]) if coord.rank == 0 else ReadStats()
        return ReshardReport(dst, self.name, topology, step, (0,) if coord.rank == 0 else (), stats,
                             time.perf_counter() - start)


def _save(source: ArraySource, dst: str, storage: Storage, *, verify: bool, written: list[int]) -> None:
    import torch.distributed.checkpoint as dcp

    state, where = state_dict_of(source)
    if storage.is_local:
        writer = dcp.FileSystemWriter(storage.path(""), single_file_per_rank=True, thread_count=1)
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(dst, single_file_per_rank=True, thread_count=1)
    if storage.exists(METADATA):
        storage.delete(METADATA)  # uncommitted while its files are replaced
    dcp.save(state, storage_writer=writer, planner=_planner(source, where, dst, verify, written),
             no_dist=True)


register_target(DcpTarget())
