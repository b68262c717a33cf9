"""torch DCP as a reshard target (``ucp reshard SRC DST --engine dcp``), and the two training
frameworks' roots of DCP directories (``--engine torchtitan``, ``--engine accelerate``).

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

``torchtitan`` writes what its ``CheckpointManager`` loads from ``checkpoint.folder``:
``DST/step-<N>/``, one DCP directory of ``{**model (flat FQNs), "optimizer": {"state.<fqn>.<state>",
"param_groups.<fqn>.<key>"} (torchtitan's flattened optimizer), "lr_scheduler", "train_state"}``
(the last two where the source carries them). torchtitan trains the attention projection as one
fused ``wqkv`` (its default, ``fuse_qkv=True``): the model keys stay ``wq``/``wk``/``wv`` (its
state-dict hooks split and fuse them) and the optimizer's are the fused parameter's, the moments
fused per KV group with the spec constant ``head_dim``; ``fuse_qkv = 0`` writes them unfused.

``accelerate`` writes what ``Accelerator.load_state`` reads under FSDP with sharded state dicts:
``pytorch_model_fsdp_0/`` (DCP of ``{"model": ...}``), ``optimizer_0/`` (DCP of ``{"optimizer":
get_optimizer_state_dict(...)}``) and ``scheduler.bin`` (the scheduler's state dict, where the
source carries one; ``torch.save``, as accelerate writes it).
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from typing import Any, Mapping

import torch

from ucp.core._coord import get_coordinator
from ucp.core._errors import CheckpointExistsError, ConvertError
from ucp.core._topology import Topology
from ucp.engines._open import layout_spec
from ucp.grammar import Spec
from ucp.resharder import ArraySource, ReadStats, ReshardReport, check_recorded, plan_ranks, register_target
from ucp.resharder._source import aliases_of, extras_of
from ucp.storage import Storage, read_counter

from ._fused import PARTS, fuse_parts, fused_names

__all__ = ["DcpTarget", "TitanTarget", "AccelerateTarget"]

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


@dataclasses.dataclass(frozen=True)
class _Fused:
    """A fused ``wqkv`` optimizer state written from its parts' states."""

    parts: tuple[str, str, str]
    state: str
    head_dim: int


@dataclasses.dataclass(frozen=True)
class _Part:
    """One DCP directory to write: its folder below the destination ('' is the destination), its
    state dict (meta tensors and plain values), and where each flattened tensor key is read from."""

    folder: str
    state: dict[str, Any]
    where: dict[str, Any]


def _planner(source: ArraySource, where: Mapping[str, Any], dst: str, verify: bool, stats: list[int]) -> Any:
    """A DCP save planner whose tensors are read from ``source`` when the writer asks for them."""
    from torch.distributed.checkpoint import DefaultSavePlanner

    class _Reading(DefaultSavePlanner):
        def resolve_data(self, write_item: Any) -> torch.Tensor | io.BytesIO:
            key = write_item.index.fqn
            if key not in where:
                return super().resolve_data(write_item)
            if isinstance(where[key], _Fused):
                return self._fused(where[key], key)
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

        def _fused(self, fused: _Fused, key: str) -> torch.Tensor:
            parts = []
            for name in fused.parts:
                t = source.read(name, fused.state, None)
                if verify:
                    check_recorded(source, name, fused.state, t, f"{dst}/{key} ({name} part)")
                stats[0] += t.numel() * t.element_size()
                parts.append(t)
            return fuse_parts(*parts, fused.head_dim).contiguous()

    return _Reading()


class DcpTarget:
    """Writes a torch DCP checkpoint (see the module docstring)."""

    name = "dcp"
    default_alignment = 1

    def parts(self, source: ArraySource, *, spec: Spec | None, step: int, dst: str) -> list[_Part]:
        """The DCP directories to write; refusals here happen before any byte is written."""
        state, where = state_dict_of(source)
        return [_Part("", state, where)]

    def side_files(self, source: ArraySource, storage: Storage) -> None:
        """Files the framework reads beside its DCP directories (none for plain DCP)."""

    def write(self, source: ArraySource, dst: str, *, topology: Topology, spec: Spec | None,
              alignment: int, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, workers: int,
              progress: bool, verify: bool = False) -> ReshardReport:
        """``verify``: each tensor written must have the fingerprint a universal ``source``
        records for it (states stored in another dtype are not checked)."""
        start = time.perf_counter()
        # refuses bad layouts before I/O; a spec of constants only (head_dim) lays nothing out
        plan_ranks(source, topology, spec=layout_spec(spec), alignment=alignment)
        parts = self.parts(source, spec=spec, step=step, dst=dst)
        storage = Storage(dst, storage_options=storage_options)
        coord = get_coordinator(600.0)
        held = [p.folder for p in parts if storage.exists(_rel(p.folder, METADATA))]
        if held and not overwrite:
            where = dst if held == [""] else f"{dst}/{held[0]}"
            raise CheckpointExistsError(f"{where} already holds a DCP checkpoint; pass overwrite=True "
                                        "(--overwrite) to replace it")
        coord.all_gather_json(None, what="starting to write the DCP checkpoint")
        written, before = [0], read_counter()
        if coord.rank == 0:
            for part in parts:
                _save(source, part, dst, storage, verify=verify, written=written)
            self.side_files(source, storage)
        coord.all_gather_json(None, what="writing the DCP checkpoint")
        read = (read_counter() - before).bytes
        stats = ReadStats(bytes_read=read, bytes_needed=written[0]) if coord.rank == 0 else ReadStats()
        return ReshardReport(dst, self.name, topology, step, (0,) if coord.rank == 0 else (), stats,
                             time.perf_counter() - start)


def _rel(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _save(source: ArraySource, part: _Part, dst: str, storage: Storage, *, verify: bool,
          written: list[int]) -> None:
    import torch.distributed.checkpoint as dcp

    url = f"{dst.rstrip('/')}/{part.folder}" if part.folder else dst
    if storage.is_local:
        writer = dcp.FileSystemWriter(storage.path(part.folder), single_file_per_rank=True, thread_count=1)
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(url, single_file_per_rank=True, thread_count=1)
    if storage.exists(_rel(part.folder, METADATA)):
        storage.delete(_rel(part.folder, METADATA))  # uncommitted while its files are replaced
    dcp.save(part.state, storage_writer=writer, planner=_planner(source, part.where, url, verify, written),
             no_dist=True)


def _prefixed(where: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """The entries of ``where`` under ``old`` (a key prefix), renamed under ``new``."""
    return {new + k[len(old):]: v for k, v in where.items() if k.startswith(old)}


# -- torchtitan --------------------------------------------------------------------------------
#: What torchtitan's ``CheckpointManager`` saves beside the model and optimizer, as the source's
#: extras carry them (a torchtitan source: its ``lr_scheduler`` and ``train_state``).
TITAN_EXTRAS = ("lr_scheduler", "train_state")


class TitanTarget(DcpTarget):
    """``DST/step-<N>/`` for torchtitan's ``CheckpointManager`` (see the module docstring)."""

    name = "torchtitan"

    def parts(self, source: ArraySource, *, spec: Spec | None, step: int, dst: str) -> list[_Part]:
        state, where = state_dict_of(source)
        constants = dict(getattr(spec, "constants", None) or {})
        fused = _titan_fusing(state, constants, dst)
        out: dict[str, Any] = dict(state["model"])
        read: dict[str, Any] = _prefixed(where, "model.", "")
        part_of = {p: f for f, parts in fused.items() for p in parts}
        flat: dict[str, Any] = {}
        for name, states in state["optim"]["state"].items():
            if name not in part_of:
                for s, meta in states.items():
                    flat[f"state.{name}.{s}"] = meta
                    read[f"optimizer.state.{name}.{s}"] = where[f"optim.state.{name}.{s}"]
                continue
            f = part_of[name]
            if name != fused[f][0]:
                continue  # the fused states are written once, at wq's place
            for s, meta in states.items():
                key = f"state.{f}.{s}"
                if s == "step":  # one count for the three parts
                    flat[key], read[f"optimizer.{key}"] = meta, where[f"optim.state.{name}.{s}"]
                    continue
                rows = sum(state["model"][p].shape[0] for p in fused[f])
                flat[key] = torch.empty((rows, *meta.shape[1:]), dtype=meta.dtype, device="meta")
                read[f"optimizer.{key}"] = _Fused(fused[f], s, constants["head_dim"])
        for group in state["optim"]["param_groups"]:
            names = dict.fromkeys(part_of.get(n, n) for n in group["params"])
            for name in names:
                flat.update({f"param_groups.{name}.{k}": v for k, v in group.items() if k != "params"})
        out["optimizer"] = flat
        extras = extras_of(source)
        out.update({k: extras[k] for k in TITAN_EXTRAS if isinstance(extras.get(k), dict)})
        return [_Part(f"step-{step}", out, read)]


def _titan_fusing(state: dict[str, Any], constants: Mapping[str, int], dst: str) -> dict[str, tuple[str, str, str]]:
    """The fused ``wqkv`` parameters to write the optimizer states of (fused name -> its parts), or
    {} with the spec constant ``fuse_qkv = 0``.

    Raises:
        ConvertError: ``wq``/``wk``/``wv`` with optimizer states and no ``head_dim``, or one that
            does not fit their rows (before any byte is written).
    """
    model, states = state["model"], state["optim"]["state"]
    fused = {f: parts for f, parts in fused_names(model).items() if any(p in states for p in parts)}
    if not fused or constants.get("fuse_qkv", 1) == 0:
        return {}
    name, parts = next(iter(fused.items()))
    head_dim = constants.get("head_dim")
    if head_dim is None:
        raise ConvertError(
            f"{dst}: {parts[0]!r}, {parts[1]!r} and {parts[2]!r} are one fused {name!r} in torchtitan's default "
            "model (fuse_qkv=True), whose optimizer states are fused per KV group by the head size: give it, "
            "e.g. `--spec 'head_dim = 128'` (the model's dim / n_heads); for a model built with "
            "fuse_qkv=False give `--spec 'fuse_qkv = 0'`")
    for f, parts in fused.items():
        q, k = model[parts[0]].shape[0], model[parts[1]].shape[0]
        if head_dim <= 0 or k % head_dim or q % k:
            raise ConvertError(f"{dst}: head_dim = {head_dim} does not fit {f!r}: {PARTS[0]} has {q} rows and "
                               f"{PARTS[1]} {k}, which must be multiples of the head size (wq's of wk's); "
                               "check the spec's head_dim")
    return fused


# -- accelerate --------------------------------------------------------------------------------
ACCEL_MODEL, ACCEL_OPTIM, ACCEL_SCHEDULER = "pytorch_model_fsdp_0", "optimizer_0", "scheduler.bin"
#: The entries ``Accelerator.save_state`` writes (``ucp reshard`` refuses a folder with others).
ACCEL_NAMES = re.compile(r"^(pytorch_model_fsdp_\d+|optimizer_\d+|scheduler(_\d+)?\.bin|random_states_\d+\.pkl"
                         r"|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin|scaler\.pt|custom_checkpoint_\d+\.pkl)$")


class AccelerateTarget(DcpTarget):
    """accelerate's FSDP ``save_state`` folder (see the module docstring)."""

    name = "accelerate"

    def parts(self, source: ArraySource, *, spec: Spec | None, step: int, dst: str) -> list[_Part]:
        state, where = state_dict_of(source)
        return [_Part(ACCEL_MODEL, {"model": state["model"]}, _prefixed(where, "model.", "model.")),
                _Part(ACCEL_OPTIM, {"optimizer": state["optim"]}, _prefixed(where, "optim.", "optimizer."))]

    def side_files(self, source: ArraySource, storage: Storage) -> None:
        scheduler = extras_of(source).get("scheduler")
        if isinstance(scheduler, dict):  # accelerate's own file: torch.save of the state dict
            buf = io.BytesIO()
            torch.save(scheduler, buf)
            storage.write(ACCEL_SCHEDULER, buf.getvalue())


register_target(DcpTarget())
register_target(TitanTarget())
register_target(AccelerateTarget())
