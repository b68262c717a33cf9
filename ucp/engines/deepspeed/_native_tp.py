"""Reshard target ``"deepspeed"`` with tp > 1: DeepSpeed's native AutoTP ZeRO-1/2 files.

What ``engine.save_checkpoint`` of an AutoTP engine (``tensor_parallel.autotp_size`` = tp) on
tp x dp ranks writes, so that a stock AutoTP job of that size loads it with plain
``engine.load_checkpoint(dir)``::

    DST/latest                                          the tag (written last: the commit)
    DST/<tag>/mp_rank_TT_model_states.pt                tp rank TT's module state dict: its shard
                                                        of each sliced weight, replicated weights
                                                        whole; shard shapes per group, counters,
                                                        LR scheduler
    DST/<tag>/[bf16_]zero_pp_rank_R_mp_rank_TT_optim_states.pt
                                                        dp rank R's ZeRO partition of tp rank TT's
                                                        shards (the rule of ``_native``)

How each parameter is cut follows DeepSpeed's AutoTP in training mode (``module_inject/auto_tp.py``,
``layers.py``, ``tp_shard.get_shard_size``; checked against 0.19.8), derived here without importing
DeepSpeed, for Llama-style decoder names:

- ``q_proj`` / ``k_proj`` / ``v_proj`` / ``gate_proj`` / ``up_proj`` / ``lm_head`` weights are
  column-parallel (``LinearLayer``): cut along dim 0;
- ``o_proj`` / ``down_proj`` weights are row-parallel (``LinearAllreduce``): cut along dim 1
  (``o_proj`` by kv heads, like q/k/v);
- ``embed_tokens`` and every ``*norm.weight`` are replicated whole on each tp rank.

MLP and ``lm_head`` rows are shared out near-evenly (``tp_grain_size`` 1: the first
``rows % tp`` ranks get one more). Attention projections are cut by kv heads, which a checkpoint
does not record: from an AutoTP source whose kv heads were split unevenly, the head count follows
from its shards and they are cut by DeepSpeed's rule (``kv // tp`` heads, one more on the first
``kv % tp`` ranks); otherwise ucp writes them only when their rows divide evenly by tp, and the
loading model's ``num_key_value_heads`` must be a multiple of tp. Biases of sliced
modules (a row-parallel bias is stored divided by tp), fused qkv, any other parameter name, pipeline
stages and ZeRO-3 are refused before any byte is written, naming the parameter and the
constraint. ``verify`` checks the replicated parameters only (a shard has no recorded fingerprint).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Mapping

import torch

from ucp.core._errors import TopologyError
from ucp.core._params import ParamInfo
from ucp.core._topology import Topology
from ucp.resharder import ArraySource, ReadStats, ReshardReport

from ._native import (LATEST, _Checker, _hyper_groups, _model_state, _rank_optimizer, optim_file,
                      plan_groups, start_tag)
from ._target import DS_FORMAT_VERSION, _torch_bytes

__all__ = ["tp_plan", "write_tp", "tp_model_file"]

_COLUMN = re.compile(r"(.*\.)?(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)\.weight")
_ATTENTION = ("q_proj", "k_proj", "v_proj")
_ROW = re.compile(r"(.*\.)?(o_proj|down_proj)\.weight")
_REPLICATED = re.compile(r"(.*\.)?(embed_tokens\.weight|[A-Za-z_]*norm\.weight)")


def tp_model_file(tp_rank: int) -> str:
    """Tensor-parallel rank ``tp_rank``'s model state file."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def _kv_heads(source: ArraySource) -> int | None:
    """The kv head count an AutoTP source reveals by its uneven attention split, else None.

    DeepSpeed gives tp rank r ``kv // tp + (r < kv % tp)`` kv heads of a ``k_proj``; when the
    recorded shards differ, the difference is one head's rows, so ``kv = rows / (max - min)``
    (checked by recomputing every recorded shard)."""
    derived = getattr(getattr(source, "source", None), "_derived", None)  # DeepSpeedSource's MpLayout
    maps = getattr(derived, "maps", None) or {}
    for name, amap in maps.items():
        if not name.endswith("k_proj.weight") or len(amap.shape) != 2:
            continue
        rows = [amap.shards[r][0] for r in sorted(amap.shards)]
        if max(rows) == min(rows):
            return None
        head = max(rows) - min(rows)
        kv, tp = amap.shape[0] // head, len(rows)
        if kv * head == amap.shape[0] and rows == [head * (kv // tp + (r < kv % tp)) for r in range(tp)]:
            return kv
        return None
    return None


def _cut(name: str, shape: tuple[int, ...], tp: int, kv: int | None = None) -> tuple[int, list[int]] | None:
    """``(dim, rows per tp rank)`` for a sliced parameter, None for a replicated one.

    Raises:
        TopologyError: a parameter AutoTP's rules (as ucp knows them) do not place.
    """
    if _REPLICATED.fullmatch(name):
        return None
    column, row = _COLUMN.fullmatch(name), _ROW.fullmatch(name)
    if not (column or row) or len(shape) != 2:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: parameter {name!r} {list(shape)} is not one "
                            "ucp knows how DeepSpeed's AutoTP cuts (Llama-style q/k/v/o_proj, gate/up/down_proj, "
                            "lm_head weights, embed_tokens and *norm weights replicated); reshard it at tp=1")
    dim = 0 if column else 1
    total = shape[dim]
    if (column and column[2] in _ATTENTION) or (row and row[2] == "o_proj"):
        if kv is not None and total % kv == 0 and kv >= tp:  # DeepSpeed's get_shard_size by kv heads
            return dim, [total * (kv // tp + (1 if r < kv % tp else 0)) // kv for r in range(tp)]
        if kv is not None:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: attention parameter {name!r} is cut by the "
                                f"source's {kv} kv heads, fewer than tp={tp} or not dividing its {total} rows; "
                                "use a tp of at most the kv head count")
        if total % tp:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: attention parameter {name!r} has {total} along dim "
                                f"{dim}, not a multiple of tp={tp}; DeepSpeed cuts it by kv heads, and uneven head "
                                "splits are not written: pick a tp that divides num_key_value_heads")
        return dim, [total // tp] * tp
    if total < tp:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: parameter {name!r} has {total} along dim {dim}, "
                            f"fewer than tp={tp}; some tp ranks would hold nothing: use a smaller tp")
    return dim, [total // tp + (1 if r < total % tp else 0) for r in range(tp)]


def tp_plan(source: ArraySource, tp: int) -> dict[str, tuple[int, list[int]]]:
    """Every sliced parameter's ``(dim, rows per tp rank)``; refuses what it cannot place."""
    plan, kv = {}, _kv_heads(source)
    for name in source.names():
        info = source.info(name)
        if name.endswith(".bias") and _REPLICATED.fullmatch(name) is None:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: parameter {name!r} is a bias; DeepSpeed's "
                                "AutoTP stores a row-parallel bias divided by tp and ucp does not write tp "
                                "biases yet: reshard at tp=1")
        cut = _cut(name, tuple(info.shape), tp, kv)
        if cut is not None:
            plan[name] = cut
    for name in source.buffer_names():
        if re.search(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|lm_head)\.", name):
            raise TopologyError(f"engine='deepspeed' with tp={tp}: buffer {name!r} belongs to a module AutoTP "
                                "cuts; ucp does not write it: reshard at tp=1")
    return plan


class _TpView:
    """``source`` as tp rank ``rank`` holds it: sliced parameters have their shard's shape and reads
    are shifted into the shard's rows; everything else is the source's."""

    def __init__(self, source: ArraySource, plan: Mapping[str, tuple[int, list[int]]], rank: int) -> None:
        self._source, self._plan, self._rank = source, plan, rank

    def _shard(self, name: str) -> tuple[int, int, int] | None:
        if name not in self._plan:
            return None
        dim, sizes = self._plan[name]
        lo = sum(sizes[:self._rank])
        return dim, lo, lo + sizes[self._rank]

    def info(self, name: str) -> ParamInfo:
        info, cut = self._source.info(name), self._shard(name)
        if cut is None:
            return info
        dim, lo, hi = cut
        shape = list(info.shape)
        shape[dim] = hi - lo
        return dataclasses.replace(info, shape=tuple(shape))

    def read(self, name: str, state: str | None, region: Any) -> torch.Tensor:
        cut = self._shard(name)
        if cut is None:
            return self._source.read(name, state, region)
        dim, lo, hi = cut
        full = self._source.info(name).shape
        if region is None:
            region = tuple((0, hi - lo) if d == dim else (0, n) for d, n in enumerate(full))
        region = tuple((a + lo, b + lo) if d == dim else (a, b) for d, (a, b) in enumerate(region))
        return self._source.read(name, state, region)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._source, attr)


class _Whole:
    """Hands the checker only the parameters every tp rank holds whole (tp rank 0's partitions)."""

    def __init__(self, check: _Checker, plan: Mapping[str, Any]) -> None:
        self._check, self._plan = check, plan

    def add(self, name: str, *args: Any) -> None:
        if name not in self._plan:
            self._check.add(name, *args)


def write_tp(name: str, source: ArraySource, dst: str, *, topology: Topology, step: int, overwrite: bool,
             storage_options: Mapping[str, Any] | None, verify: bool) -> ReshardReport:
    """Writes the files of the module docstring; every refusal comes before any byte is written.

    Called by one process or every process of a torchrun job: the (tp rank, dp rank) optimizer
    files are shared out round-robin; process 0 writes the tp ranks' model files, then ``latest``."""
    start, tp = time.perf_counter(), topology.tp
    if topology.zero not in (1, 2) or topology.pp != 1:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: the target {topology} needs zero=1 or 2 and pp=1 "
                            "(AutoTP files are written for ZeRO-1/2 data-parallel engines only)")
    from ._native_pipe import pipe_checkpoint

    if pipe_checkpoint(source) is not None:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: {source.url} is a PipelineModule checkpoint; "
                            "AutoTP files are written for a plain (non-pipeline) model only")
    plan = tp_plan(source, tp)
    views = [_TpView(source, plan, t) for t in range(tp)]
    groups, dtype, states = plan_groups(views[0])
    hyper = _hyper_groups(source)
    scheduler, storage, tag, coord = start_tag(source, dst, step, overwrite, storage_options, " (AutoTP)")
    dp, bf16 = topology.dp, dtype == torch.bfloat16
    jobs = [(t, r) for t in range(tp) for r in range(dp)][coord.rank::coord.world_size]
    stats = ReadStats()
    check = _Whole(_Checker(source, f"{storage.url}/{tag}"), plan) if verify else None
    for t, r in jobs:
        osd, got = _rank_optimizer(views[t], groups, states, hyper, dp, r, topology.zero, step,
                                   check if t == 0 else None)
        storage.write(f"{tag}/{optim_file(r, bf16, t)}",
                      _torch_bytes({"optimizer_state_dict": osd, "ds_version": DS_FORMAT_VERSION}))
        stats = stats + got
    coord.all_gather_json(None, what="gathering DeepSpeed optimizer files (AutoTP)")
    if coord.rank == 0:
        for t, view in enumerate(views):
            model = _model_state(view, groups, dtype, topology, step, scheduler)
            model.update(mp_world_size=tp, checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": tp})
            storage.write(f"{tag}/{tp_model_file(t)}", _torch_bytes(model))
        storage.write(LATEST, tag.encode())
    coord.all_gather_json(None, what="committing the DeepSpeed checkpoint (AutoTP)")
    return ReshardReport(dst, name, topology, step, tuple(t * dp + r for t, r in jobs), stats,
                         time.perf_counter() - start)

