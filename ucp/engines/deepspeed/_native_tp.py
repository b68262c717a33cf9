"""Reshard target ``"deepspeed"`` with tp > 1: DeepSpeed's native AutoTP ZeRO-1/2/3 files.

What ``engine.save_checkpoint`` of an AutoTP engine (``tensor_parallel.autotp_size`` = tp) on
tp x dp ranks writes, so that a stock AutoTP job of that size loads it with plain
``engine.load_checkpoint(dir)``::

    DST/latest                                          the tag (written last: the commit)
    DST/<tag>/mp_rank_TT_model_states.pt                ZeRO-1/2: tp rank TT's module state dict:
                                                        its shard of each sliced weight, replicated
                                                        weights whole; shard shapes per group,
                                                        counters, LR scheduler
    DST/<tag>/zero_pp_rank_R_mp_rank_TT_model_states.pt ZeRO-3, instead: the same with size-0
                                                        placeholders and dp rank R's frozen fragments
    DST/<tag>/[bf16_]zero_pp_rank_R_mp_rank_TT_optim_states.pt
                                                        dp rank R's ZeRO partition of tp rank TT's
                                                        shards (the rules of ``_native``)

How each parameter is cut follows DeepSpeed's AutoTP in training mode (``module_inject/auto_tp.py``,
``layers.py``, ``tp_shard.get_shard_size``; checked against 0.19.8), derived here without importing
DeepSpeed, for Llama-style decoder names:

- ``q_proj`` / ``k_proj`` / ``v_proj`` / ``gate_proj`` / ``up_proj`` / ``lm_head`` weights are
  column-parallel (``LinearLayer``): cut along dim 0, their biases like their rows;
- ``o_proj`` / ``down_proj`` weights are row-parallel (``LinearAllreduce``): cut along dim 1
  (``o_proj`` by kv heads, like q/k/v); their biases stay whole on every tp rank;
- ``embed_tokens`` and every ``*norm`` parameter are replicated whole on each tp rank.

MLP and ``lm_head`` rows are shared out near-evenly (``tp_grain_size`` 1: the first
``rows % tp`` ranks get one more). Attention projections are cut by kv heads (``kv // tp`` heads,
one more on the first ``kv % tp`` ranks), a count a checkpoint does not record: it comes from the
spec's ``kv_heads`` constant (``--spec``, ``--config``'s Hugging Face config via :func:`head_spec`,
or a universal checkpoint's stored spec), else from an AutoTP source whose kv heads were split
unevenly (read off its shards); without either, attention rows are cut evenly when tp divides them
(DeepSpeed's split when tp divides the kv heads) and refused otherwise, naming the missing count.
Fused qkv, any other parameter name, pipeline stages and ZeRO-3 with fp16 are refused before any
byte is written, naming the parameter and the constraint. ``verify`` checks the replicated
parameters only (a shard has no recorded fingerprint).
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

from ._native import (LATEST, _Checker, _ds_bytes, _hyper_groups, _model_state, _rank_optimizer, _rank_zero3,
                      _zero3_model, optim_file, plan_groups, start_tag, zero3_model_file)
from ._target import DS_FORMAT_VERSION, _torch_bytes

__all__ = ["tp_plan", "write_tp", "tp_model_file", "head_spec", "kv_heads"]

_COLUMN = re.compile(r"(.*\.)?(q_proj|k_proj|v_proj|gate_proj|up_proj|lm_head)\.(weight|bias)")
_ATTENTION = ("q_proj", "k_proj", "v_proj")
_ROW = re.compile(r"(.*\.)?(o_proj|down_proj)\.weight")
_REPLICATED = re.compile(r"(.*\.)?(embed_tokens\.weight|[A-Za-z_]*norm\.(weight|bias)|(o_proj|down_proj)\.bias)")
_HOW = ("pass the loading model's head count: --config config.json (its Hugging Face config) or a spec "
        "with 'kv_heads = N' (--spec)")


def tp_model_file(tp_rank: int) -> str:
    """Tensor-parallel rank ``tp_rank``'s model state file."""
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def head_spec(config: Mapping[str, Any], where: str) -> str:
    """UCL constants (``heads``, ``kv_heads``) from a Hugging Face ``config.json``, as DeepSpeed's
    AutoTP reads them (``num_key_value_heads``, else ``num_attention_heads``; a multimodal config's
    ``text_config``); what ``ucp reshard --config`` passes as the spec.

    Raises:
        TopologyError: the config names no head count.
    """
    config = config.get("text_config") or config
    heads = config.get("num_attention_heads")
    kv = config.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or not isinstance(kv, int) or heads < 1 or kv < 1:
        raise TopologyError(f"{where}: no integer num_attention_heads (and num_key_value_heads) in the config; "
                            "the DeepSpeed AutoTP target cuts attention by them: pass the model's config.json")
    return f"heads = {heads}\nkv_heads = {kv}\n"


def _spec_heads(spec: Any) -> tuple[int | None, int | None]:
    """``(heads, kv_heads)`` a spec's constants give (kv defaults to heads, as DeepSpeed does)."""
    constants = dict(getattr(spec, "constants", None) or {})
    heads, kv = constants.get("heads"), constants.get("kv_heads")
    return heads, kv if kv is not None else heads


def _source_kv_heads(source: ArraySource) -> int | None:
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


def kv_heads(source: ArraySource, spec: Any, tp: int) -> tuple[int | None, str]:
    """The kv head count AutoTP cuts attention by, and where it came from: the spec's constants
    (``--spec``, ``--config``, or the universal checkpoint's stored spec), else an AutoTP source's
    uneven split, else ``(None, "")``.

    Raises:
        TopologyError: the spec's and the source's counts differ, or heads is not a multiple of kv.
    """
    heads, given = _spec_heads(spec)
    found = _source_kv_heads(source)
    if given is not None:
        where = f"the spec's kv_heads = {given}"
        if heads is not None and heads % given:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: the spec's heads = {heads} is not a multiple of "
                                f"kv_heads = {given}; give the loading model's head counts")
        if found is not None and found != given:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: {where}, but {source.url}'s uneven AutoTP "
                                f"split shows {found} kv heads; give the loading model's head counts")
        return given, where
    if found is not None:
        return found, f"the source's {found} kv heads"
    return None, ""


def _cut(name: str, shape: tuple[int, ...], tp: int, kv: int | None = None,
         where: str = "") -> tuple[int, list[int]] | None:
    """``(dim, rows per tp rank)`` for a sliced parameter, None for a replicated one (embeddings,
    norms, the bias of a row-parallel projection: DeepSpeed 0.19 keeps it whole on every tp rank).
    A column-parallel bias is cut like its weight's rows.

    Raises:
        TopologyError: a parameter AutoTP's rules (as ucp knows them) do not place.
    """
    if _REPLICATED.fullmatch(name):
        return None
    column, row = _COLUMN.fullmatch(name), _ROW.fullmatch(name)
    ndim = 1 if column and column[3] == "bias" else 2
    if not (column or row) or len(shape) != ndim:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: parameter {name!r} {list(shape)} is not one "
                            "ucp knows how DeepSpeed's AutoTP cuts (Llama-style q/k/v/o_proj, gate/up/down_proj, "
                            "lm_head weights and biases, embed_tokens and *norm parameters replicated); reshard "
                            "it at tp=1")
    dim = 0 if column else 1
    total = shape[dim]
    if (column and column[2] in _ATTENTION) or (row and row[2] == "o_proj"):
        if kv is not None and kv < tp:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: attention parameter {name!r} is cut by {where}, "
                                f"fewer than tp={tp}; use a tp of at most the kv head count")
        if kv is not None and total % kv:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: attention parameter {name!r} has {total} along "
                                f"dim {dim}, not a multiple of {where}; give the loading model's head counts")
        if kv is not None:  # DeepSpeed's get_shard_size by kv heads: the first kv % tp ranks hold one more
            return dim, [total * (kv // tp + (1 if r < kv % tp else 0)) // kv for r in range(tp)]
        if total % tp:
            raise TopologyError(f"engine='deepspeed' with tp={tp}: attention parameter {name!r} has {total} along "
                                f"dim {dim}, not a multiple of tp={tp}: DeepSpeed cuts it by kv heads, unevenly "
                                f"here, and the source does not record the head count; {_HOW}")
        return dim, [total // tp] * tp
    if total < tp:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: parameter {name!r} has {total} along dim {dim}, "
                            f"fewer than tp={tp}; some tp ranks would hold nothing: use a smaller tp")
    return dim, [total // tp + (1 if r < total % tp else 0) for r in range(tp)]


def tp_plan(source: ArraySource, tp: int, spec: Any = None) -> dict[str, tuple[int, list[int]]]:
    """Every sliced parameter's ``(dim, rows per tp rank)``; refuses what it cannot place."""
    plan = {}
    kv, where = kv_heads(source, spec, tp)
    for name in source.names():
        cut = _cut(name, tuple(source.info(name).shape), tp, kv, where)
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
             storage_options: Mapping[str, Any] | None, verify: bool, spec: Any = None) -> ReshardReport:
    """Writes the files of the module docstring; every refusal comes before any byte is written.
    ``spec``: its ``heads`` / ``kv_heads`` constants say how attention is cut (see :func:`kv_heads`).

    Called by one process or every process of a torchrun job: the (tp rank, dp rank) optimizer
    files (ZeRO-3: and model files) are shared out round-robin; process 0 writes the tp ranks'
    model files (ZeRO-1/2), then ``latest``."""
    start, tp, zero3 = time.perf_counter(), topology.tp, topology.zero == 3
    if topology.pp != 1:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: the target {topology} needs pp=1 (AutoTP files "
                            "are written for data-parallel ZeRO-1/2/3 engines only)")
    from ._native_pipe import pipe_checkpoint

    if pipe_checkpoint(source) is not None:
        raise TopologyError(f"engine='deepspeed' with tp={tp}: {source.url} is a PipelineModule checkpoint; "
                            "AutoTP files are written for a plain (non-pipeline) model only")
    plan = tp_plan(source, tp, spec)
    views = [_TpView(source, plan, t) for t in range(tp)]
    groups, dtype, states = plan_groups(views[0])
    if zero3 and dtype == torch.float16:
        raise TopologyError(f"engine='deepspeed' with tp={tp}, zero=3 and an fp16 model: DeepSpeed's ZeRO-3 files "
                            "hold the dynamic loss scaler's state, which ucp does not carry; use zero=1/2 or a "
                            "bf16/fp32 model")
    hyper = _hyper_groups(source)
    scheduler, storage, tag, coord = start_tag(source, dst, step, overwrite, storage_options, " (AutoTP)")
    dp, bf16 = topology.dp, dtype == torch.bfloat16
    jobs = [(t, r) for t in range(tp) for r in range(dp)][coord.rank::coord.world_size]
    stats = ReadStats()
    check = _Whole(_Checker(source, f"{storage.url}/{tag}"), plan) if verify else None
    models: dict[int, dict[str, Any]] = {}

    def model_of(t: int) -> dict[str, Any]:
        if t not in models:
            models[t] = _model_state(views[t], groups, dtype, topology, step, scheduler)
            models[t].update(mp_world_size=tp, checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": tp})
        return models[t]

    for t, r in jobs:
        if zero3:  # every (tp, dp) rank: its model file of placeholders and frozen fragments
            osd, got, frags, subs = _rank_zero3(views[t], groups, states, hyper, dp, r, step,
                                                check if t == 0 else None)
            storage.write(f"{tag}/{zero3_model_file(r, t)}", _torch_bytes(_zero3_model(model_of(t), frags, subs)))
            storage.write(f"{tag}/{optim_file(r, bf16, t)}",
                          _ds_bytes({"optimizer_state_dict": osd, "ds_version": DS_FORMAT_VERSION}))
        else:
            osd, got = _rank_optimizer(views[t], groups, states, hyper, dp, r, topology.zero, step,
                                       check if t == 0 else None)
            storage.write(f"{tag}/{optim_file(r, bf16, t)}",
                          _torch_bytes({"optimizer_state_dict": osd, "ds_version": DS_FORMAT_VERSION}))
        stats = stats + got
    coord.all_gather_json(None, what="gathering DeepSpeed optimizer files (AutoTP)")
    if coord.rank == 0:
        for t in range(tp) if not zero3 else ():
            storage.write(f"{tag}/{tp_model_file(t)}", _torch_bytes(model_of(t)))
        storage.write(LATEST, tag.encode())
    coord.all_gather_json(None, what="committing the DeepSpeed checkpoint (AutoTP)")
    return ReshardReport(dst, name, topology, step, tuple(t * dp + r for t, r in jobs), stats,
                         time.perf_counter() - start)
