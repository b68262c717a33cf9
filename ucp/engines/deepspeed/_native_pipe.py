"""Reshard target ``"deepspeed"`` for a ``PipelineModule``: DeepSpeed's native pipeline ZeRO-1 files.

What ``engine.save_checkpoint`` of a ``PipelineEngine`` on ``pp`` stages x ``dp`` ranks writes, so that
a stock DeepSpeed job with the same ``PipelineModule`` loads it with plain ``engine.load_checkpoint``::

    DST/latest                                            the tag (written last: the commit)
    DST/<tag>/layer_XX-model_states.pt                    layer XX's state dict (weights in model dtype,
                                                          buffers, frozen parameters): GLOBAL per layer
    DST/<tag>/mp_rank_SS_model_states.pt                  stage SS: no module (``None``), its parameter
                                                          shapes per group, counters, LR scheduler
    DST/<tag>/[bf16_]zero_pp_rank_R_mp_rank_SS_optim_states.pt
                                                          dp rank R's ZeRO partition of stage SS's
                                                          param groups (ZeRO-1, the rule of ``_native``)

The layer files are global per layer; what depends on ``pp`` is which layers each stage holds, which
the loading job's ``PipelineModule`` decides by its ``partition_method`` (a checkpoint does not record
it): ``partition`` is that method (``parameters``, DeepSpeed's default, or ``uniform``; the maths is in
``_pipe_partition``) or the stage boundaries themselves. ``parameters`` counts each layer's trainable
elements, taken from the checkpoint (a layer's numbered trainable parameters; a tied module's at each
of its occurrences; frozen parameters, which the checkpoint keeps in the layer files only, not). A
tied module (``TiedLayerSpec``, parameters ``tied_modules.<key>.*``) is in the optimizer of every stage
that holds one of its occurrences; its weights go to the layer file the source kept them in.

The layer list is read from the source's pipeline record (``deepspeed.pipeline`` in its extras, see
``_pipe.pipeline_record``: a DeepSpeed PipelineModule checkpoint, or a universal checkpoint converted
from one): its layer files, gaps in their numbering (layers without state), and file-less tied layers
(a ``TiedLayerSpec`` with ``forward_fn``, e.g. a tied lm head) placed from the stages of a pp > 1
source. Layers the checkpoint cannot show (a pp=1 source shows no file-less layer) are named with
``extra_layers``. With a method (not boundaries), that method must give the source its own stages,
else the target is refused: a wrong method or layer list would put layers on the wrong stages.
Without ``partition`` at the source's own pp, the stages are the source's (``parameters`` or else
``uniform``, whichever gives them).

Refused before any byte is written: more stages than layers, boundaries that leave a stage empty or
do not end at the last layer, a stage without a trainable parameter in some param group, a ``type:``
partition (the checkpoint has no class names), tp > 1 sources and ZeRO-2/3 (DeepSpeed's
``PipelineEngine`` asserts ZeRO stage 0 or 1).
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch

from ucp.core._errors import TopologyError
from ucp.core._topology import Topology
from ucp.resharder import ArraySource, ReadStats, ReshardReport
from ucp.resharder._source import extras_of

from ._native import (LATEST, _Checker, _hyper_groups, _rank_optimizer, optim_file,
                      plan_groups, start_tag)
from ._pipe_partition import parse_partition, stage_parts
from ._target import DS_FORMAT_VERSION, _torch_bytes

__all__ = ["pipe_checkpoint", "write_pipe", "layer_file", "stage_model_file"]

_NUMBERED = re.compile(r"(\d+)\.(.+)")
_TIED = re.compile(r"tied_modules\.([^.]+)\.(.+)")


def layer_file(layer: int) -> str:
    """A pipeline layer's file (no tensor-parallel suffix)."""
    return f"layer_{layer:02d}-model_states.pt"


def stage_model_file(stage: int) -> str:
    """A pipeline stage's model state file (``mp_rank`` = stage when tp = 1)."""
    return f"mp_rank_{stage:02d}_model_states.pt"


def pipe_checkpoint(source: ArraySource) -> dict[str, Any] | None:
    """The pipeline record (:func:`~ucp.engines.deepspeed._pipe.pipeline_record`) of a DeepSpeed
    ``PipelineModule`` checkpoint behind ``source``, straight or through a universal checkpoint's
    extras, else None."""
    return (extras_of(source).get("deepspeed") or {}).get("pipeline")


class _Stage:
    """``source`` seen through one stage's parameters (what ``plan_groups`` and ``_rank_optimizer`` read)."""

    def __init__(self, source: ArraySource, names: list[str]) -> None:
        self._source, self._names = source, names

    def names(self) -> list[str]:
        return list(self._names)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._source, attr)


def _parse_extra(items: Sequence[str]) -> dict[int, str | None]:
    """``--extra-layer`` values: ``INDEX`` (a function) or ``INDEX=KEY`` (a ``TiedLayerSpec`` with ``forward_fn``)."""
    out: dict[int, str | None] = {}
    for item in items:
        index, sep, key = str(item).partition("=")
        try:
            i = int(index)
        except ValueError:
            i = -1
        if i < 0 or (sep and not key.strip()):
            raise TopologyError(f"extra layer {item!r}: expected INDEX (a layer without state, e.g. a function) or "
                                "INDEX=KEY (a TiedLayerSpec with forward_fn of tied key KEY), e.g. 5=embed")
        out[i] = key.strip() or None
    return out


class _Layers:
    """The loading job's layer list as the checkpoint shows it: per layer index, the trainable elements
    DeepSpeed's ``parameters`` partition counts and the tied key of a ``TiedLayerSpec``.

    Layers with a file are the checkpoint's; a gap in their numbering is a layer without state (a
    function); a tied module a source stage holds without the layer file of any of its occurrences
    in that stage's span is a ``TiedLayerSpec`` with ``forward_fn`` (it saves no file): placed in a gap
    of that span after the stage's own layers, else on the last stage after every layer, else in
    the span's first gap. ``extra`` (from ``--extra-layer``) names file-less layers the checkpoint
    cannot show (a pp=1 source shows none)."""

    def __init__(self, source: ArraySource, record: Mapping[str, Any], extra: Mapping[int, str | None]) -> None:
        self.files = set(record["layer_files"])
        self.stages = [list(names) for names in record["stages"]]
        names = list(dict.fromkeys(n for st in self.stages for n in st))
        self.numbered: dict[int, list[str]] = {}
        self.tied_names: dict[str, list[str]] = {}
        for n in names:
            if (m := _NUMBERED.fullmatch(n)) is not None:
                self.numbered.setdefault(int(m[1]), []).append(n)
            elif (m := _TIED.fullmatch(n)) is not None:
                self.tied_names.setdefault(m[1], []).append(n)
        for i, key in extra.items():
            if i in self.files or i in self.numbered:
                raise TopologyError(f"extra layer {i}: layer {i} has a file in the checkpoint; --extra-layer names "
                                    "layers that save none")
            if key is not None and key not in self.tied_names:
                raise TopologyError(f"extra layer {i}={key}: the checkpoint has no tied module {key!r} (it has "
                                    f"{sorted(self.tied_names) or 'none'})")
        self.tied_at = {i: k for k, i in record["tied_files"].items()}
        self.tied_at.update({i: k for i, k in extra.items() if k is not None})
        self.size = max([*self.files, *self.numbered, *extra], default=-1) + 1
        taken = self.files | set(self.numbered) | set(extra)
        if len(self.stages) > 1:
            self._place_file_less_tied(taken)
        info = source.info
        self.counts = []
        for i in range(self.size):
            held = self.tied_names.get(self.tied_at[i], []) if i in self.tied_at else self.numbered.get(i, [])
            self.counts.append(sum(math.prod(info(n).shape) for n in held if not info(n).frozen))
        self.order = ([n for n in names if _TIED.fullmatch(n)] + [n for n in names if not _TIED.fullmatch(n)])

    def _place_file_less_tied(self, taken: set[int]) -> None:
        known = [{int(m[1]) for n in st if (m := _NUMBERED.fullmatch(n))} for st in self.stages]
        for s, stage in enumerate(self.stages):
            lo = max((max(k) for k in known[:s] if k), default=-1) + 1
            hi = min((min(k) for k in known[s + 1:] if k), default=None)
            end = self.size if hi is None else hi
            for key in dict.fromkeys(m[1] for n in stage if (m := _TIED.fullmatch(n))):
                if any(lo <= i < end and k == key for i, k in self.tied_at.items()):
                    continue
                gaps = [i for i in range(lo, end) if i not in taken and i not in self.tied_at]
                after = [i for i in gaps if i > max(known[s], default=lo - 1)]
                if after:
                    self.tied_at[after[0]] = key
                elif hi is None:  # the last stage: after every layer (a tied lm head)
                    self.tied_at[self.size] = key
                    self.size += 1
                elif gaps:
                    self.tied_at[gaps[0]] = key
                else:
                    raise TopologyError(f"source pipeline stage {s} holds tied module {key!r}, but no layer of its "
                                        f"span ({lo} to {end - 1}) can be it; name the layer with --extra-layer "
                                        f"INDEX={key}")

    def stage_of(self, parts: list[int]) -> list[list[str]]:
        """Each stage's parameter names (tied modules first, as a ``PipelineModule`` registers them)."""
        out = []
        for lo, hi in zip(parts, parts[1:]):
            keys = {k for i, k in self.tied_at.items() if lo <= i < hi}
            out.append([n for n in self.order if ((m := _TIED.fullmatch(n)) and m[1] in keys)
                        or ((m := _NUMBERED.fullmatch(n)) and lo <= int(m[1]) < hi)])
        return out

    def check_source(self, partition: str, where: str) -> None:
        """Refuses when ``partition`` does not give the source's own stages (the layer list or the
        method is not the one the source was partitioned with)."""
        pp = len(self.stages)
        try:
            parts = stage_parts(partition, self.counts, pp)
        except TopologyError as e:
            raise TopologyError(f"{where}: {e}") from None
        for s, (want, got) in enumerate(zip(self.stages, self.stage_of(parts))):
            if set(want) != set(got):
                raise TopologyError(
                    f"partition_method={partition!r} over the {self.size} layers ucp sees in {where} (trainable "
                    f"elements {self.counts}) gives source stage {s} layers {parts[s]} to {parts[s + 1] - 1}, but "
                    f"it held {sorted(set(want) ^ set(got))[:4]} differently: the source was partitioned otherwise, "
                    "or has layers without a file ucp cannot see. Pass the loading job's partition_method "
                    "(--partition uniform), its stage boundaries (--partition 0,3,6), or the missing layers "
                    "(--extra-layer INDEX[=TIED_KEY])")


def _stages(source: ArraySource, record: Mapping[str, Any] | None, pp: int, partition: str | None,
            extra: Sequence[str]) -> tuple[list[list[str]], list[int], _Layers]:
    """Each target stage's parameter names in its optimizer's order, and the stage boundaries.

    Raises:
        TopologyError: the stages cannot be known (names the constraint and what to do instead).
    """
    if record is None:
        raise TopologyError(f"engine='deepspeed' with pp={pp} writes a PipelineModule's layer files, which needs "
                            f"its layers; {source.url} is not a DeepSpeed PipelineModule checkpoint (or a universal "
                            "checkpoint converted from one), the only source that records them")
    if record.get("tp", 1) != 1:
        raise TopologyError(f"engine='deepspeed' with pp={pp}: {source.url} was saved with tp={record['tp']}; a "
                            "pipeline target is written from tp=1 PipelineModule checkpoints only")
    method = parse_partition(partition if partition is not None else "parameters")
    layers = _Layers(source, record, _parse_extra(extra))
    if partition is None and pp == len(layers.stages) > 1:
        # the source's own pp: its stages, whichever method gave them (the loading job's gives them too)
        try:
            layers.check_source(method, source.url)
        except TopologyError:
            method = "uniform"
    if isinstance(method, str):
        layers.check_source(method, source.url)
    parts = stage_parts(method, layers.counts, pp)
    return layers.stage_of(parts), parts, layers


def _layers(source: ArraySource, record: Mapping[str, Any], dtype: torch.dtype) -> dict[int, OrderedDict]:
    """Every layer file's state dict: numbered parameters and buffers by their layer index, each tied
    module in the file the source kept it in, a layer file without tensors (a module without state)
    empty."""
    tied = {k: i for k, i in record["tied_files"].items()}
    out: dict[int, OrderedDict] = {i: OrderedDict() for i in record["layer_files"]}
    for name in source.names():
        info = source.info(name)
        if (m := _NUMBERED.fullmatch(name)) is not None:
            layer, key = int(m[1]), m[2]
        elif (m := _TIED.fullmatch(name)) is not None and m[1] in tied:
            layer, key = tied[m[1]], m[2]
        else:
            raise TopologyError(f"parameter {name!r} is neither a numbered layer's nor a tied module's whose layer "
                                f"file the source shows; a PipelineModule's layer files cannot be written")
        state = "param" if "param" in info.states else "fp32"
        value = source.read(name, state, None).to(info.dtype or dtype).contiguous()
        out.setdefault(layer, OrderedDict())[key] = value
    for name in source.buffer_names():
        m = _NUMBERED.fullmatch(name)
        if m is None:
            raise TopologyError(f"buffer {name!r} belongs to no numbered layer; a PipelineModule's layer files "
                                "cannot hold it")
        out.setdefault(int(m[1]), OrderedDict())[m[2]] = source.read(name, None, None).contiguous()
    return out


def _stage_model(source: ArraySource, groups: list[list[str]], span: tuple[int, int], topology: Topology,
                 step: int, scheduler: Any) -> dict[str, Any]:
    """A stage's ``mp_rank_SS_model_states.pt``: the module lives in the layer files; ``buffer_names``
    lists the buffers of the stage's layers (``span``: its first and past-last layer index)."""
    shapes = [OrderedDict((n, torch.Size(source.info(n).shape)) for n in names) for names in groups]
    buffers = [n for n in source.buffer_names() if (m := _NUMBERED.fullmatch(n)) and span[0] <= int(m[1]) < span[1]]
    return {
        "module": None, "buffer_names": buffers, "optimizer": None, "param_shapes": shapes,
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None,
        "lr_scheduler": scheduler, "data_sampler": None, "random_ltd": None,
        "skipped_steps": 0, "global_steps": step, "dp_world_size": topology.dp, "mp_world_size": topology.pp,
        "checkpoint_parallel_dimensions": {"pp_degree": topology.pp, "tp_degree": 1},
        "ds_version": DS_FORMAT_VERSION,
        "ucp": {"source": source.url, "topology": str(topology)},
    }


def write_pipe(name: str, source: ArraySource, dst: str, *, topology: Topology, step: int, overwrite: bool,
               storage_options: Mapping[str, Any] | None, verify: bool, partition: str | None = None,
               extra_layers: Sequence[str] = ()) -> ReshardReport:
    """Writes the files of the module docstring; every refusal comes before any byte is written.

    ``partition``: the loading job's ``partition_method`` (``parameters``, DeepSpeed's default, or
    ``uniform``) or its stage boundaries (``0,3,6``); ``extra_layers``: layers that save no file
    (``INDEX`` or ``INDEX=TIED_KEY``). Called by one process or every process of a torchrun job: the
    (stage, dp rank) optimizer files are shared out round-robin; process 0 writes the layer and stage
    files, then ``latest``."""
    start = time.perf_counter()
    if topology.zero != 1:
        raise TopologyError(f"engine='deepspeed' with pp={topology.pp}, zero={topology.zero}: DeepSpeed's "
                            "PipelineEngine runs ZeRO stage 0 or 1 only (it asserts so when it starts), and "
                            "ucp writes ZeRO files: use zero=1")
    record = pipe_checkpoint(source)
    stages, parts, _ = _stages(source, record, topology.pp, partition, extra_layers)
    views = [_Stage(source, names) for names in stages]
    plans = []
    for s, view in enumerate(views):
        try:
            plans.append(plan_groups(view))
        except TopologyError as e:
            raise TopologyError(f"pipeline stage {s} (layers {parts[s]} to {parts[s + 1] - 1}): {e}") from None
    dtype = plans[0][1]
    layers = _layers(source, record, dtype)  # reads weights only; refuses unplaceable names before writing
    hyper = _hyper_groups(source)
    scheduler, storage, tag, coord = start_tag(source, dst, step, overwrite, storage_options, " (pipeline)")
    dp, bf16 = topology.dp, dtype == torch.bfloat16
    jobs = [(s, r) for s in range(topology.pp) for r in range(dp)][coord.rank::coord.world_size]
    stats = ReadStats()
    check = _Checker(source, f"{storage.url}/{tag}") if verify else None
    for s, r in jobs:
        groups, _, states = plans[s]
        osd, got = _rank_optimizer(views[s], groups, states, hyper, dp, r, topology.zero, step, check)
        storage.write(f"{tag}/{optim_file(r, bf16, s)}",
                      _torch_bytes({"optimizer_state_dict": osd, "ds_version": DS_FORMAT_VERSION}))
        stats = stats + got
    coord.all_gather_json(None, what="gathering DeepSpeed optimizer files (pipeline)")
    if coord.rank == 0:
        for layer, state in sorted(layers.items()):
            storage.write(f"{tag}/{layer_file(layer)}", _torch_bytes(state))
        for s, view in enumerate(views):
            storage.write(f"{tag}/{stage_model_file(s)}", _torch_bytes(
                _stage_model(view, plans[s][0], (parts[s], parts[s + 1]), topology, step, scheduler)))
        storage.write(LATEST, tag.encode())
    coord.all_gather_json(None, what="committing the DeepSpeed checkpoint (pipeline)")
    return ReshardReport(dst, name, topology, step, tuple(s * dp + r for s, r in jobs), stats, time.perf_counter() - start)
