"""Reshard target ``"deepspeed"``: DeepSpeed's own (native) ZeRO-1/2/3 checkpoint files for any dp.

What ``engine.save_checkpoint`` of a ZeRO-1/2 engine on ``dp`` ranks writes, so that an unmodified
DeepSpeed job of that size loads it with plain ``engine.load_checkpoint(dir)``::

    DST/latest                                          the tag (written last: the commit)
    DST/<tag>/mp_rank_00_model_states.pt                module state dict (weights in model dtype,
                                                        frozen parameters, buffers), parameter shapes
                                                        per group, counters, LR scheduler state
    DST/<tag>/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt
                                                        dp rank R's ZeRO partition: fp32 masters and
                                                        the base optimizer's state, one flat tensor
                                                        per param group (ZeRO-3: per sub-group)
    DST/<tag>/zero_pp_rank_R_mp_rank_00_model_states.pt
                                                        ZeRO-3, instead of the model file above: per
                                                        rank, size-0 parameter placeholders, buffers,
                                                        the rank's fragment of each frozen parameter

The partitioning is DeepSpeed's (``stage_1_and_2.py``, checked against 0.19.8), computed here with
:func:`ucp.resharder.group_partition`: a group's trainable parameters, in the optimizer's order, are
laid end to end with no per-parameter padding (``parameter_alignment`` is off by default), the total
is padded with zeros to a multiple of ``2 * dp`` and cut into ``dp`` equal partitions. The fp32
partition is stored without the group's trailing padding (``group_paddings``), the optimizer's
states with it (a "rigid" base optimizer state dict, as DeepSpeed saves by default).

ZeRO-3 (``stage3.py``) cuts every parameter alone into ``dp`` shares of ``ceil(numel / dp)``
elements (the last zero-padded) and lays a param group's shares end to end, split into sub-groups
past DeepSpeed's default ``sub_group_size``.

The files are DeepSpeed's pickled format, not ucp's; they hold only tensors, dicts, lists, numbers,
strings and ``torch.Size``, and for ZeRO-3 DeepSpeed's static ``LossScaler`` (its loader requires
one), named in the pickle without importing DeepSpeed. A PipelineModule (pp > 1, or a pipeline source)
is written by ``_native_pipe``, tp > 1 (AutoTP) by ``_native_tp``, a MoE model by ``_native_moe``.
ZeRO-0 and fp16 under ZeRO-3 are refused before any byte is written. The loading job must use DeepSpeed's
defaults for ``parameter_alignment``, ``round_robin_gradients`` and ``sub_group_size``, and ZeRO-1
with bf16 must not ask for fp32 gradient accumulation (DeepSpeed then uses its BF16_Optimizer,
whose files differ).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any, Mapping

import torch

from ucp.core._coord import get_coordinator
from ucp.core._errors import CheckpointExistsError, TopologyError
from ucp.core._params import ParamInfo
from ucp.core._topology import Topology
from ucp.grammar import Spec
from ucp.resharder import (ArraySource, ReadStats, ReshardReport, check_recorded, flat_boxes,
                           group_partition, param_partition, register_target)
from ucp.resharder._source import aliases_of, extras_of
from ucp.storage import Storage

from ._target import DS_FORMAT_VERSION, MODEL_FILE, _torch_bytes, tag_for

__all__ = ["DeepSpeedNativeTarget", "LATEST", "optim_file", "zero3_model_file", "plan_groups"]

LATEST = "latest"
#: DeepSpeed's ``nccl_start_alignment_factor``: flat groups are padded to a multiple of this times dp.
ALIGN_FACTOR = 2
#: DeepSpeed's default ``zero_optimization.sub_group_size``: ZeRO-3 splits a param group into flat
#: sub-groups once their partitions reach this many elements.
SUB_GROUP_SIZE = 1_000_000_000
#: Per-parameter states that are not element-wise optimizer states.
_NOT_FLAT = ("param", "fp32", "step")


def zero3_model_file(dp_rank: int, mp_rank: int = 0) -> str:
    """ZeRO-3's per-rank model file (placeholders, buffers, this rank's frozen parameter fragments)."""
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_model_states.pt"


def optim_file(dp_rank: int, bf16: bool, mp_rank: int = 0) -> str:
    """The optimizer file name DeepSpeed gives dp rank ``dp_rank`` of model-parallel rank ``mp_rank``
    (``bf16_`` prefix in bf16 runs)."""
    return f"{'bf16_' if bf16 else ''}zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def start_tag(source: ArraySource, dst: str, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, what: str) -> tuple[Any, Storage, str, Any]:
    """What every DeepSpeed native writer does before its first byte: the source's LR scheduler
    state, the destination and its tag, the coordination group; the tag cleared (see
    :func:`clear_tag`) and every process past that point. Returns (scheduler, storage, tag, coord)."""
    scheduler = (extras_of(source).get("deepspeed") or {}).get("lr_scheduler")
    storage, tag = Storage(dst, storage_options=storage_options), tag_for(step)
    coord = get_coordinator(600.0)
    clear_tag(storage, tag, dst, overwrite, coord)
    coord.all_gather_json(None, what=f"starting to reshard for DeepSpeed{what}")
    return scheduler, storage, tag, coord


def clear_tag(storage: Storage, tag: str, dst: str, overwrite: bool, coord: Any) -> None:
    """Refuses an existing tag unless ``overwrite``; then (process 0) uncommits it and removes every
    model, layer and optimizer file in it, so none of another dp or stage stays beside the new ones."""
    if not any(storage.exists(f"{tag}/{f}") for f in (MODEL_FILE, zero3_model_file(0))):
        return
    if not overwrite:
        raise CheckpointExistsError(f"{dst} already holds DeepSpeed tag {tag}; pass overwrite=True "
                                    "(--overwrite) to replace it")
    if coord.rank == 0:
        if storage.exists(LATEST):
            storage.delete(LATEST)
        for name in storage.list(tag):
            if name.endswith(("_model_states.pt", "_optim_states.pt")):
                storage.delete(f"{tag}/{name}")


def check_topology(topology: Topology) -> None:
    """What this target writes: ZeRO stage 1, 2 or 3, data parallelism only.

    Raises:
        TopologyError: names the axis or stage and what to use instead.
    """
    others = {ax: getattr(topology, ax) for ax in ("ep", "sp") if getattr(topology, ax, 1) != 1}
    if others:
        raise TopologyError(f"engine='deepspeed' writes DeepSpeed's native data-parallel, AutoTP and pipeline "
                            f"ZeRO files, but the target topology {topology} has {others}; use ep=sp=1 (ep needs "
                            "a MoE source)")
    if topology.zero not in (1, 2, 3):
        raise TopologyError(f"engine='deepspeed' writes ZeRO stage 1, 2 or 3 files (the target is {topology}, "
                            f"zero={topology.zero}); use zero=1, 2 or 3 (without ZeRO, DeepSpeed saves the "
                            "torch optimizer whole, a layout this target does not write)")


def plan_groups(source: ArraySource) -> tuple[list[list[str]], torch.dtype, tuple[str, ...]]:
    """The flat groups (trainable names per optimizer param group, in the source's order), the
    model dtype, and the element-wise optimizer states every trainable parameter carries.

    A weights-only source (no param groups and no optimizer state: a Hugging Face model) becomes one
    group of every parameter with no optimizer state: its files hold fp32 masters equal to the
    weights and no base optimizer state or param group (see :func:`weights_only`).

    Raises:
        TopologyError: a parameter DeepSpeed's ZeRO-1/2 layout cannot hold (names it and why).
    """
    fresh = weights_only(source)
    groups: list[list[str]] = [[]] if fresh else [[] for _ in source.param_groups]
    dtype, states = None, None
    for name in source.names():
        info = source.info(name)
        if info.frozen:
            continue
        if fresh:
            info = ParamInfo(info.shape, info.dtype, info.states, info.frozen, 0)
        if info.group is None or not 0 <= info.group < len(groups):
            raise TopologyError(f"parameter {name!r} is trainable but belongs to optimizer param group "
                                f"{info.group} (the source has {len(groups)}); DeepSpeed's ZeRO files need "
                                "every trainable parameter in a param group")
        pdtype = info.dtype or torch.float32
        if dtype is None:
            dtype, first = pdtype, name
        elif pdtype != dtype:
            raise TopologyError(f"parameter {name!r} is {pdtype}, {first!r} is {dtype}; a DeepSpeed ZeRO "
                                "engine trains one model dtype, so it cannot load this checkpoint")
        mine = tuple(s for s in info.states if s not in _NOT_FLAT)
        if states is None:
            states, first_states = mine, name
        elif set(mine) != set(states):
            raise TopologyError(f"parameter {name!r} has optimizer states {sorted(mine)}, {first_states!r} "
                                f"{sorted(states)}; DeepSpeed keeps the same states for every parameter")
        groups[info.group].append(name)
    for g, names in enumerate(groups):
        if not names:
            raise TopologyError(f"optimizer param group {g} holds no trainable parameter; DeepSpeed ZeRO "
                                "drops empty groups, so its files would not line up: remove the group")
    return groups, dtype or torch.float32, tuple(states or ())


def weights_only(source: ArraySource) -> bool:
    """True for a source without optimizer: no param groups, no state besides the weights.

    Its DeepSpeed files start training afresh: the job loads them with
    ``engine.load_checkpoint(dir, load_optimizer_states=False)`` (plus
    ``load_lr_scheduler_states=False`` if it has a scheduler): DeepSpeed loads the module by name,
    sets its fp32 masters from those weights (for ZeRO-3 from the files' masters, read by their
    ``param_shapes``) and keeps its own new optimizer with the job's hyper-parameters. The flat
    masters follow the source's name order (a safetensors folder records no other), not
    necessarily the model's, so they are not to be copied flat. A plain ``load_checkpoint`` stops
    before copying them, with torch's "different number of parameter groups" error: the files hold
    no param group to restore.
    """
    return not source.param_groups and all(set(source.info(n).states) <= {"param", "fp32"}
                                           for n in source.names())


class DeepSpeedNativeTarget:
    """Writes DeepSpeed's native ZeRO-1/2/3 files (see the module docstring) for ``dp`` ranks.

    Called by one process, or by every process of a torchrun job: dp ranks' optimizer files are
    shared out round-robin; process 0 writes the model file and ``latest`` (the commit) once every
    process finished its files.
    """

    name = "deepspeed"
    default_alignment = ALIGN_FACTOR

    def write(self, source: ArraySource, dst: str, *, topology: Topology, spec: Spec | None,
              alignment: int, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, workers: int,
              progress: bool, verify: bool = False, partition: str | None = None,
              extra_layers: tuple[str, ...] = ()) -> ReshardReport:
        """``alignment`` must be DeepSpeed's (2). ``partition`` / ``extra_layers``: a PipelineModule
        target's stages (see ``_native_pipe``). ``verify``: each parameter's state, put back
        together from the flat partitions built, must have the fingerprint a universal ``source``
        records for it (states stored in another dtype, sources without recorded fingerprints, and
        parameters whose partitions other processes of a torchrun job write are not checked)."""
        start = time.perf_counter()
        from ._native_moe import moe_source, write_moe

        if (partition is not None or extra_layers) and (topology.ep != 1 or topology.tp != 1 or moe_source(source)):
            raise TopologyError(f"partition / extra layers place a PipelineModule's layers on pipeline stages; the "
                                f"target {topology} writes DeepSpeed's MoE or AutoTP files, which have no stages: "
                                "leave them unset")
        if topology.ep != 1 or moe_source(source):  # MoE experts: expert files, expert groups
            return write_moe(self.name, source, dst, topology=topology, step=step, overwrite=overwrite,
                             storage_options=storage_options, verify=verify)
        check_topology(topology)  # before any I/O
        if alignment != ALIGN_FACTOR:
            raise TopologyError(f"alignment={alignment}: DeepSpeed ZeRO-1/2 pads flat groups to "
                                f"{ALIGN_FACTOR} x dp elements; leave --alignment unset")
        from ._native_pipe import pipe_checkpoint, write_pipe

        if topology.tp != 1:  # AutoTP: per-tp-rank model files of shards
            from ._native_tp import write_tp

            return write_tp(self.name, source, dst, topology=topology, step=step, overwrite=overwrite,
                            storage_options=storage_options, verify=verify, spec=spec)
        if topology.pp != 1 or pipe_checkpoint(source) is not None:  # a PipelineModule: per-layer files
            return write_pipe(self.name, source, dst, topology=topology, step=step, overwrite=overwrite,
                              storage_options=storage_options, verify=verify, partition=partition,
                              extra_layers=extra_layers)
        if partition is not None or extra_layers:
            raise TopologyError("partition / extra layers place a PipelineModule's layers on pipeline stages; "
                                f"{source.url} is not a DeepSpeed PipelineModule checkpoint: leave them unset")
        groups, dtype, states = plan_groups(source)
        if topology.zero == 3 and dtype == torch.float16:
            raise TopologyError("engine='deepspeed' with zero=3 and an fp16 model: DeepSpeed's ZeRO-3 files hold "
                                "the dynamic loss scaler's state, which ucp does not carry; use zero=1/2 or "
                                "a bf16/fp32 model")
        hyper = _hyper_groups(source)
        scheduler, storage, tag, coord = start_tag(source, dst, step, overwrite, storage_options, "")
        dp, bf16 = topology.dp, dtype == torch.bfloat16
        mine = list(range(dp))[coord.rank::coord.world_size]
        stats = ReadStats()
        check = _Checker(source, f"{storage.url}/{tag}") if verify else None
        model = (_model_state(source, groups, dtype, topology, step, scheduler)
                 if coord.rank == 0 or (topology.zero == 3 and mine) else None)
        for r in mine:
            if topology.zero == 3:
                osd, s, frags, subs = _rank_zero3(source, groups, states, hyper, dp, r, step, check)
                storage.write(f"{tag}/{zero3_model_file(r)}", _torch_bytes(_zero3_model(model, frags, subs)))
                storage.write(f"{tag}/{optim_file(r, bf16)}", _ds_bytes(
                    {"optimizer_state_dict": osd, "ds_version": DS_FORMAT_VERSION}))
            else:
                osd, s = _rank_optimizer(source, groups, states, hyper, dp, r, topology.zero, step, check)
                storage.write(f"{tag}/{optim_file(r, bf16)}",
                              _torch_bytes({"optimizer_state_dict": osd, "ds_version": DS_FORMAT_VERSION}))
            stats = stats + s
        coord.all_gather_json(None, what="gathering DeepSpeed optimizer files")
        if coord.rank == 0:
            if topology.zero != 3:
                storage.write(f"{tag}/{MODEL_FILE}", _torch_bytes(model))
            storage.write(LATEST, tag.encode())
        coord.all_gather_json(None, what="committing the DeepSpeed checkpoint")
        return ReshardReport(dst, self.name, topology, step, tuple(mine), stats,
                             time.perf_counter() - start)


def _hyper_groups(source: ArraySource) -> list[dict[str, Any]]:
    """Each param group's hyper-parameters as torch's optimizers keep them (betas a tuple)."""
    out = []
    for group in source.param_groups:
        out.append({k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in group.items()
                    if k != "params"})
    return out


def _step_of(source: ArraySource, name: str, step: int) -> float:
    """The optimizer's step count for ``name``'s group: its own ``step`` state, else the checkpoint's."""
    if "step" in source.info(name).states:
        return float(source.read(name, "step", None).reshape(-1)[0])
    return float(source.step if source.step is not None else step)


def _rank_optimizer(source: ArraySource, groups: list[list[str]], states: tuple[str, ...],
                    hyper: list[dict[str, Any]], dp: int, rank: int, stage: int,
                    step: int, check: "_Checker | None",
                    split: list[tuple[int, int]] | None = None) -> tuple[dict[str, Any], ReadStats]:
    """dp rank ``rank``'s ``optimizer_state_dict`` (what ``DeepSpeedZeroOptimizer.state_dict`` gives);
    ``check`` is handed every parameter's slice of each flat tensor built. ``split``: per group,
    (partition count, this rank's index among them) when a group is not cut over all ``dp`` ranks
    (MoE expert groups, see ``_native_moe``)."""
    t0, nbytes, reads = time.perf_counter(), 0, 0
    fp32_parts, group_pads, base_state = [], [], {}
    split = split or [(dp, rank)] * len(groups)
    for g, names in enumerate(groups):
        shapes = [tuple(source.info(n).shape) for n in names]
        part = group_partition([math.prod(s) for s in shapes], *split[g], ALIGN_FACTOR)
        flats = {s: torch.zeros(part.partition_numel, dtype=torch.float32) for s in ("fp32", *states)}
        for i, lo, hi in part.overlaps():
            name, info = names[i], source.info(names[i])
            master = "fp32" if "fp32" in info.states else "param"  # an fp32 model: weights are masters
            for box, first in flat_boxes(shapes[i], lo, hi):
                at = part.offsets[i] + first - part.start
                n = math.prod(b - a for a, b in box)
                for s, flat in flats.items():
                    values = source.read(name, master if s == "fp32" else s, box)
                    flat[at:at + n].copy_(values.reshape(-1))
                    nbytes, reads = nbytes + n * 4, reads + 1
        if check is not None:
            for i, lo, hi in part.overlaps():
                at = part.offsets[i] + lo - part.start
                for s, flat in flats.items():
                    check.add(names[i], s, shapes[i], lo, flat[at:at + hi - lo])
        pad = min(max(part.stop - part.numel, 0), part.partition_numel)  # zeros past the group's end
        fp32_parts.append(flats.pop("fp32")[:part.partition_numel - pad].clone())
        group_pads.append(pad)
        st = {"step": torch.tensor(_step_of(source, names[0], step), dtype=torch.float32)} if states else {}
        if states:
            base_state[g] = {**st, **flats}
    base = {"state": base_state, "param_groups": [{**h, "params": [g]} for g, h in enumerate(hyper)]}
    osd = {
        "base_optimizer_state": base,
        "single_partition_of_fp32_groups": fp32_parts,
        "zero_stage": stage,
        "group_paddings": group_pads,
        "param_alignment_paddings": [[0] * len(names) for names in groups],
        "partition_count": [count for count, _ in split],
        "ds_version": DS_FORMAT_VERSION,
    }
    return osd, ReadStats(nbytes, nbytes, 0, reads, time.perf_counter() - t0)


def _sub_groups(groups: list[list[str]], parts: Mapping[str, int]) -> list[tuple[int, list[str]]]:
    """ZeRO-3's flat sub-groups: ``(param group, names)``, split as ``_create_fp16_sub_groups`` does."""
    out = []
    for g, names in enumerate(groups):
        if sum(parts[n] for n in names) <= SUB_GROUP_SIZE:
            out.append((g, list(names)))
            continue
        current, size = [], 0
        for n in names:
            current.append(n)
            size += parts[n]
            if size >= SUB_GROUP_SIZE or n == names[-1]:
                out.append((g, current))
                current, size = [], 0
    return out


def _rank_zero3(source: ArraySource, groups: list[list[str]], states: tuple[str, ...],
                hyper: list[dict[str, Any]], dp: int, rank: int, step: int,
                check: "_Checker | None") -> tuple[dict[str, Any], ReadStats, dict[str, torch.Tensor],
                                                   list[list[str]]]:
    """dp rank ``rank``'s ZeRO-3 optimizer state dict (``DeepSpeedZeroOptimizer_Stage3._rigid_state_dict``)
    and its frozen parameter fragments: every parameter is cut alone into ``dp`` parts of
    ``ceil(numel / dp)`` elements (the last one zero-padded), a sub-group's parts laid end to end."""
    t0, nbytes, reads = time.perf_counter(), 0, 0
    parts = {n: param_partition(math.prod(source.info(n).shape), dp, rank) for g in groups for n in g}
    fp32_flat, base_state, members = [], {}, [[] for _ in groups]
    subs = _sub_groups(groups, {n: p[2] for n, p in parts.items()})
    for sg, (g, names) in enumerate(subs):
        flats = {s: torch.zeros(sum(parts[n][2] for n in names), dtype=torch.float32) for s in ("fp32", *states)}
        at = 0
        for name in names:
            info, (lo, hi, part) = source.info(name), parts[name]
            master = "fp32" if "fp32" in info.states else "param"
            for box, first in flat_boxes(tuple(info.shape), lo, hi):
                n = math.prod(b - a for a, b in box)
                for s, flat in flats.items():
                    values = source.read(name, master if s == "fp32" else s, box)
                    flat[at + first - lo:at + first - lo + n].copy_(values.reshape(-1))
                    nbytes, reads = nbytes + n * 4, reads + 1
            if check is not None and hi > lo:
                for s, flat in flats.items():
                    check.add(name, s, tuple(info.shape), lo, flat[at:at + hi - lo])
            at += part
        fp32_flat.append(flats.pop("fp32"))
        st = {"step": torch.tensor(_step_of(source, names[0], step), dtype=torch.float32)} if states else {}
        base_state[sg] = {**st, **flats}
        members[g].append(sg)
    frags = {}
    for name in source.names():
        info = source.info(name)
        if info.frozen:
            lo, hi, part = param_partition(math.prod(info.shape), dp, rank)
            frag = torch.zeros(part, dtype=info.dtype or torch.float32)
            state = "param" if "param" in info.states else "fp32"
            if hi > lo:
                frag[:hi - lo].copy_(source.read(name, state, None).reshape(-1)[lo:hi])
            frags[name] = frag
    osd = {
        "zero_stage": 3, "loss_scaler": _StaticLossScaler(), "dynamic_loss_scale": False, "overflow": False,
        "partition_count": dp,
        "optimizer_state_dict": {"state": base_state,
                                 "param_groups": [{**h, "params": members[g]} for g, h in enumerate(hyper)]},
        "fp32_flat_groups": fp32_flat,
    }
    return osd, ReadStats(nbytes, nbytes, 0, reads, time.perf_counter() - t0), frags, [n for _, n in subs]


def _zero3_model(model: Mapping[str, Any], frags: Mapping[str, torch.Tensor],
                 subs: list[list[str]]) -> dict[str, Any]:
    """A ZeRO-3 rank's model file: ``model`` with empty placeholders for every parameter (ZeRO-3
    saves its partitioned parameters as size-0 tensors), buffers whole, ``param_shapes`` per flat
    sub-group, and this rank's frozen fragments."""
    buffers = set(model["buffer_names"])
    module = OrderedDict((k, v if k in buffers else torch.empty(0, dtype=v.dtype))
                         for k, v in model["module"].items())
    frozen = OrderedDict((n, model["module"][n].shape) for n in frags)
    shapes = [OrderedDict((n, model["module"][n].shape) for n in names) for names in subs]
    return {**model, "module": module, "param_shapes": shapes, "frozen_param_shapes": frozen,
            "frozen_param_fragments": OrderedDict(frags)}


class _StaticLossScaler:
    """Pickled as DeepSpeed's ``LossScaler`` at scale 1 (what a bf16/fp32 ZeRO-3 engine keeps, and
    its loader requires), by name, without importing DeepSpeed."""

    def __reduce_ex__(self, protocol: int) -> tuple:
        import copyreg

        return copyreg.__newobj__, (_StaticLossScaler,), {"cur_scale": 1.0, "dynamic": False}


def _ds_bytes(obj: Any) -> bytes:
    """``torch.save`` bytes of ``obj``, with :class:`_StaticLossScaler` named as DeepSpeed's class."""
    import io
    import pickle
    import types

    class Pickler(pickle._Pickler):  # noqa: SLF001 - the Python pickler lets one global be renamed
        def save_global(self, obj: Any, name: str | None = None) -> None:
            if obj is _StaticLossScaler:
                self.write(pickle.GLOBAL + b"deepspeed.runtime.fp16.loss_scaler\nLossScaler\n")
                self.memoize(obj)
                return
            super().save_global(obj, name)

    module = types.SimpleNamespace(__name__="pickle", Pickler=Pickler, Unpickler=pickle.Unpickler,
                                   HIGHEST_PROTOCOL=pickle.HIGHEST_PROTOCOL, dump=pickle.dump)
    buf = io.BytesIO()
    torch.save(obj, buf, pickle_module=module)
    return buf.getvalue()


class _Checker:
    """Puts each parameter's states back together from the flat partitions as they are built, and
    checks every completed one against the source's recorded fingerprint (``check_recorded``)."""

    def __init__(self, source: ArraySource, where: str) -> None:
        self.source, self.where = source, where
        self.pending: dict[tuple[str, str], tuple[torch.Tensor, list[int]]] = {}

    def add(self, name: str, state: str, shape: tuple[int, ...], lo: int, values: torch.Tensor) -> None:
        numel = math.prod(shape)
        whole, filled = self.pending.setdefault((name, state), (torch.empty(numel, dtype=values.dtype), [0]))
        whole[lo:lo + values.numel()].copy_(values)
        filled[0] += values.numel()
        if filled[0] == numel:
            del self.pending[(name, state)]
            info = self.source.info(name)
            stored = "param" if state == "fp32" and "fp32" not in info.states else state
            check_recorded(self.source, name, stored, whole.view(shape), f"{self.where} ({name})")


def _model_state(source: ArraySource, groups: list[list[str]], dtype: torch.dtype, topology: Topology,
                 step: int, scheduler: Any) -> dict[str, Any]:
    """``mp_rank_00_model_states.pt`` as ``DeepSpeedEngine._save_checkpoint`` writes it."""
    module: OrderedDict[str, torch.Tensor] = OrderedDict()
    frozen: OrderedDict[str, torch.Size] = OrderedDict()
    for name in source.names():
        info = source.info(name)
        state = "param" if "param" in info.states else "fp32"
        module[name] = source.read(name, state, None).to(info.dtype or dtype).contiguous()
        if info.frozen:
            frozen[name] = module[name].shape
    aliases = aliases_of(source)
    for alias, target in aliases.items():
        module[alias] = module[target]  # torch.save keeps the sharing, as the module's state dict has it
    buffers = source.buffer_names()
    for name in buffers:
        module[name] = source.read(name, None, None).contiguous()
    shapes = [OrderedDict((n, module[n].shape) for n in names) for names in groups]
    stage2 = topology.zero == 2  # DeepSpeed saves frozen parameters apart only when it partitions gradients
    return {
        "module": module, "buffer_names": buffers, "optimizer": None, "param_shapes": shapes,
        "frozen_param_shapes": frozen if stage2 else None,
        "shared_params": dict(aliases),
        "frozen_param_fragments": OrderedDict((n, module[n]) for n in frozen) if stage2 else None,
        "lr_scheduler": scheduler, "data_sampler": None, "random_ltd": None,
        "skipped_steps": 0, "global_steps": step, "dp_world_size": topology.dp, "mp_world_size": 1,
        "checkpoint_parallel_dimensions": {"pp_degree": 1, "tp_degree": 1},
        "ds_version": DS_FORMAT_VERSION,
        "ucp": {"source": source.url, "topology": str(topology)},
    }


register_target(DeepSpeedNativeTarget())
