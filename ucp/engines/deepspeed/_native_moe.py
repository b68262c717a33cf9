"""Reshard target ``"deepspeed"`` for a MoE model (``deepspeed.moe.layer.MoE``) at expert parallelism ``ep``.

What ``engine.save_checkpoint`` of a ZeRO-1/2 MoE engine on ``dp`` ranks with ``ep_size=E`` writes,
so that an unmodified DeepSpeed MoE job of that size loads it with plain ``engine.load_checkpoint``::

    DST/latest                                          the tag (written last: the commit)
    DST/<tag>/mp_rank_00_model_states.pt                the module state dict without the experts,
                                                        ``num_experts`` per MoE layer, counters,
                                                        LR scheduler state
    DST/<tag>/layer_<L>_expert_<X>_mp_rank_00_model_states.pt
                                                        MoE layer L's global expert X: its weights
                                                        (model dtype) under their global names
    DST/<tag>/[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt
                                                        dp rank R's ZeRO partitions

DeepSpeed (default order, expert before data) puts dp rank ``r`` in expert-parallel rank ``r % E``
and expert-data-parallel rank ``r // E``. Non-expert param groups are cut over all ``dp`` ranks as
in ``_native``; an expert param group (``moe: True``) of rank ``r`` holds only the local experts of
its expert-parallel rank (MoE layer with ``X`` experts: global experts ``e * X/E`` to
``(e + 1) * X/E - 1``, named by local ids ``0 .. X/E - 1``), laid end to end in the module's order
and cut over the ``dp / E`` ranks of its expert-data-parallel group (its ``partition_count``).

The source's experts are read by their global names (a universal checkpoint of a DeepSpeed MoE
run, any ep and dp): the target ep may differ from the source's. ``E`` must divide ``dp`` and every
MoE layer's expert count; tp, sp, pp, ZeRO-0 and ZeRO-3 are refused, all before any byte is written.
The loading job must use DeepSpeed's default rank order (no ``use_data_before_expert_parallelism``)
and, as for ``_native``, DeepSpeed's default ``parameter_alignment`` and ``round_robin_gradients``.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from typing import Any, Mapping

import torch

from ucp.core._errors import TopologyError
from ucp.core._topology import Topology
from ucp.resharder import ArraySource, ReadStats, ReshardReport
from ucp.storage import Storage

from ._native import (LATEST, _Checker, _hyper_groups, _model_state, _rank_optimizer,
                      optim_file, plan_groups, start_tag)
from ._target import DS_FORMAT_VERSION, MODEL_FILE, _torch_bytes

__all__ = ["moe_source", "write_moe", "expert_file"]

_EXPERT = re.compile(r"(.*\.deepspeed_experts\.)(\d+)(\..*)")


def expert_file(layer: int, expert: int) -> str:
    """The file DeepSpeed keeps MoE layer ``layer``'s global expert ``expert`` in."""
    return f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"


def moe_source(source: ArraySource) -> bool:
    """Whether ``source`` holds DeepSpeed MoE experts (``...deepspeed_experts.<id>...`` parameters)."""
    return any(_EXPERT.fullmatch(n) for n in source.names())


class _Experts:
    """The source's MoE layers (by the order their experts first appear) and each layer's expert count."""

    def __init__(self, source: ArraySource) -> None:
        self.layers: dict[str, int] = {}  # expert prefix -> MoE layer id
        ids: dict[str, set[int]] = {}
        for name in source.names():
            if m := _EXPERT.fullmatch(name):
                self.layers.setdefault(m[1], len(self.layers))
                ids.setdefault(m[1], set()).add(int(m[2]))
        self.counts = {}
        for prefix, have in ids.items():
            if have != set(range(len(have))):
                raise TopologyError(f"MoE layer {prefix[:-1]!r} holds experts {sorted(have)}, not 0..{len(have) - 1}; "
                                    "the source does not hold every expert of the layer")
            self.counts[prefix] = len(have)

    def check(self, ep: int, source: ArraySource) -> None:
        for prefix, count in self.counts.items():
            if count % ep:
                first = next(n for n in source.names() if n.startswith(prefix))
                raise TopologyError(f"ep={ep} does not divide the {count} experts of MoE layer {prefix[:-1]!r} "
                                    f"(parameter {first!r}): each expert-parallel rank must hold the same number "
                                    f"of experts; use an ep dividing {count}")

    def local(self, name: str, ep: int) -> tuple[int, str]:
        """(expert-parallel rank, local name) of the global expert parameter ``name`` at ``ep``."""
        m = _EXPERT.fullmatch(name)
        per = self.counts[m[1]] // ep
        return int(m[2]) // per, f"{m[1]}{int(m[2]) % per}{m[3]}"


def _check(source: ArraySource, topology: Topology, experts: _Experts) -> None:
    others = {ax: getattr(topology, ax) for ax in ("tp", "sp", "pp") if getattr(topology, ax) != 1}
    if others:
        raise TopologyError(f"engine='deepspeed' with expert parallelism writes data x expert parallel ZeRO-1/2 "
                            f"files, but the target topology {topology} has {others}; use tp=sp=pp=1")
    if topology.zero not in (1, 2):
        raise TopologyError(f"engine='deepspeed' writes MoE checkpoints for ZeRO stage 1 or 2 (the target is "
                            f"{topology}, zero={topology.zero}); use zero=1 or 2")
    if not experts.counts:
        raise TopologyError(f"engine='deepspeed' with ep={topology.ep}: the source holds no DeepSpeed MoE expert "
                            "parameters (...deepspeed_experts.N...); use ep=1")
    if topology.dp % topology.ep:
        raise TopologyError(f"ep={topology.ep} does not divide dp={topology.dp}: DeepSpeed cuts the dp ranks into "
                            "expert-parallel groups of ep ranks; use a dp that is a multiple of ep")
    experts.check(topology.ep, source)


def _expert_group(names: list[str], g: int) -> bool:
    """Whether flat group ``g`` is an expert group (all its parameters are experts, none mixed in)."""
    hits = [bool(_EXPERT.fullmatch(n)) for n in names]
    if any(hits) and not all(hits):
        odd = names[hits.index(False)] if hits[0] else names[hits.index(True)]
        raise TopologyError(f"optimizer param group {g} mixes MoE expert and other parameters ({odd!r}); "
                            "DeepSpeed keeps experts in their own groups (split_params_into_different_moe_groups"
                            "_for_optimizer): regroup the source")
    return all(hits)


def _rank_groups(groups: list[list[str]], moe: list[bool], experts: _Experts, ep: int,
                 ep_rank: int) -> list[list[str]]:
    """The source names in each flat group of expert-parallel rank ``ep_rank``, in the module's order
    (MoE layer, local expert, the expert's own parameter order)."""
    out = []
    for names, is_moe in zip(groups, moe):
        if not is_moe:
            out.append(list(names))
            continue
        first: dict[Any, int] = {}
        for i, n in enumerate(names):
            m = _EXPERT.fullmatch(n)
            first.setdefault(m[1], i)
            first.setdefault((m[1], m[3]), i)
        mine = []
        for n in names:
            e, local = experts.local(n, ep)
            if e == ep_rank:
                m = _EXPERT.fullmatch(local)
                mine.append(((first[m[1]], int(m[2]), first[(m[1], m[3])]), n))
        out.append([n for _, n in sorted(mine)])
    return out


def write_moe(target: str, source: ArraySource, dst: str, *, topology: Topology, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, verify: bool) -> ReshardReport:
    """Writes the files above (called by :class:`DeepSpeedNativeTarget` for a MoE source or ep > 1)."""
    start = time.perf_counter()
    experts = _Experts(source)
    _check(source, topology, experts)  # before any I/O
    groups, dtype, states = plan_groups(source)
    moe = [_expert_group(names, g) for g, names in enumerate(groups)]
    ep, dp = topology.ep, topology.dp
    hyper = [{**h, "name": f"ep_size_{ep}"} if moe[g] else h for g, h in enumerate(_hyper_groups(source))]
    per_rank = [_rank_groups(groups, moe, experts, ep, e) for e in range(ep)]
    scheduler, storage, tag, coord = start_tag(source, dst, step, overwrite, storage_options, " (MoE)")
    bf16 = dtype == torch.bfloat16
    mine = list(range(dp))[coord.rank::coord.world_size]
    stats = ReadStats()
    check = _Checker(source, f"{storage.url}/{tag}") if verify else None
    for r in mine:
        ep_rank, edp_rank = r % ep, r // ep
        split = [(dp // ep, edp_rank) if is_moe else (dp, r) for is_moe in moe]
        osd, s = _rank_optimizer(source, per_rank[ep_rank], states, hyper, dp, r, topology.zero, step,
                                 check, split)
        storage.write(f"{tag}/{optim_file(r, bf16)}",
                      _torch_bytes({"optimizer_state_dict": osd, "ds_version": DS_FORMAT_VERSION}))
        stats = stats + s
    if coord.rank == 0:
        _write_experts(storage, tag, source, experts, dtype)
    coord.all_gather_json(None, what="gathering DeepSpeed optimizer files")
    if coord.rank == 0:
        model = _model_state(source, per_rank[0], dtype, topology, step, scheduler)
        storage.write(f"{tag}/{MODEL_FILE}", _torch_bytes(_without_experts(model, experts, ep)))
        storage.write(LATEST, tag.encode())
    coord.all_gather_json(None, what="committing the DeepSpeed checkpoint")
    return ReshardReport(dst, target, topology, step, tuple(mine), stats, time.perf_counter() - start,
                         world_size=topology.dp)  # the ep groups are cut out of the dp ranks


def _write_experts(storage: Storage, tag: str, source: ArraySource, experts: _Experts, dtype: torch.dtype) -> None:
    """One file per MoE layer and global expert: its weights in model dtype, under global names."""
    files: dict[tuple[int, int], OrderedDict[str, torch.Tensor]] = {}
    for name in source.names():
        if m := _EXPERT.fullmatch(name):
            info = source.info(name)
            state = "param" if "param" in info.states else "fp32"
            tensor = source.read(name, state, None).to(info.dtype or dtype).contiguous()
            files.setdefault((experts.layers[m[1]], int(m[2])), OrderedDict())[name] = tensor
    for (layer, expert), tensors in sorted(files.items()):
        storage.write(f"{tag}/{expert_file(layer, expert)}", _torch_bytes(tensors))


def _without_experts(model: dict[str, Any], experts: _Experts, ep: int) -> dict[str, Any]:
    """The model file: DeepSpeed keeps the experts apart (``_get_non_moe_state_dict``), names expert
    parameters by local ids in ``param_shapes`` and records each MoE layer's expert count."""
    module = OrderedDict((k, v) for k, v in model["module"].items() if not _EXPERT.fullmatch(k))
    shapes = [OrderedDict((experts.local(n, ep)[1] if _EXPERT.fullmatch(n) else n, s) for n, s in group.items())
              for group in model["param_shapes"]]
    return {**model, "module": module, "param_shapes": shapes,
            "num_experts": [experts.counts[p] for p in sorted(experts.layers, key=experts.layers.get)]}
