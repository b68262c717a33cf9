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

A tied module (``TiedLayerSpec``, parameters ``tied_modules.<key>.*``) is in the optimizer of every
stage that uses it; its weights go to the layer file the source kept them in. Which stage owns which
layer is decided by the loading job's ``PipelineModule`` (``partition_method``), which a checkpoint does
not record: the stages are therefore taken from a DeepSpeed ``PipelineModule`` source, for the same
``pp`` (each stage keeps its layers) or for ``pp=1`` (one stage holds them all). Any other ``pp``, a
source that does not record its stages (a universal checkpoint), tp > 1 sources and ZeRO-2/3 (DeepSpeed's
``PipelineEngine`` asserts ZeRO stage 0 or 1) are refused before any byte is written.
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

from ._native import (LATEST, _Checker, _hyper_groups, _rank_optimizer, optim_file,
                      plan_groups, start_tag)
from ._pipe import _tied
from ._reader import DeepSpeedCheckpoint
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


def pipe_checkpoint(source: ArraySource) -> DeepSpeedCheckpoint | None:
    """The DeepSpeed checkpoint behind ``source`` when it was saved by a ``PipelineModule``, else None."""
    ckpt = getattr(getattr(source, "source", None), "ckpt", None)
    if isinstance(ckpt, DeepSpeedCheckpoint) and ckpt.layer_files():
        return ckpt
    return None


class _Stage:
    """``source`` seen through one stage's parameters (what ``plan_groups`` and ``_rank_optimizer`` read)."""

    def __init__(self, source: ArraySource, names: list[str]) -> None:
        self._source, self._names = source, names

    def names(self) -> list[str]:
        return list(self._names)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._source, attr)


def _stages(source: ArraySource, ckpt: DeepSpeedCheckpoint | None, pp: int) -> list[list[str]]:
    """Each target stage's parameter names, in its optimizer's order (tied modules first, as a
    ``PipelineModule`` registers them).

    Raises:
        TopologyError: the stages cannot be known (names the constraint and what to do instead).
    """
    if ckpt is None:
        raise TopologyError(f"engine='deepspeed' with pp={pp} writes a PipelineModule's layer files, which needs "
                            f"the stage each layer is on; {source.url} is not a DeepSpeed PipelineModule "
                            "checkpoint, the only source that records it: reshard straight from one")
    if ckpt.tp_size != 1:
        raise TopologyError(f"engine='deepspeed' with pp={pp}: {ckpt.tag_dir} was saved with tp={ckpt.tp_size}; "
                            "a pipeline target is written from tp=1 PipelineModule checkpoints only")
    src = [_stage_order(ckpt, s) for s in range(ckpt.pp_size)]
    if pp == ckpt.pp_size:
        return src
    if pp == 1:
        every = list(dict.fromkeys(n for names in src for n in names))
        return [[n for n in every if _TIED.fullmatch(n)] + [n for n in every if not _TIED.fullmatch(n)]]
    raise TopologyError(f"engine='deepspeed' with pp={pp}: {ckpt.tag_dir} was saved with pp={ckpt.pp_size}, and "
                        "which stage a layer goes to at another pp depends on the loading job's partition_method, "
                        f"which the checkpoint does not record; use pp={ckpt.pp_size} (any dp) or pp=1")


def _stage_order(ckpt: DeepSpeedCheckpoint, stage: int) -> list[str]:
    """A source stage's parameters in its optimizer's order (its ``param_shapes``: the reader lists
    a tied module last), then any others it holds."""
    path = ckpt._files.model[stage]  # noqa: SLF001 - the reader's file index and cached trees
    ordered = [n for group in ckpt._load(path).get("param_shapes") or [] for n in group]  # noqa: SLF001
    return list(dict.fromkeys(ordered + ckpt.names(mp_rank=stage)))


def _layers(source: ArraySource, ckpt: DeepSpeedCheckpoint, dtype: torch.dtype) -> dict[int, OrderedDict]:
    """Every layer file's state dict: numbered parameters and buffers by their layer index, each tied
    module in the file the source kept it in."""
    files = {i: p for (i, suffix), p in ckpt.layer_files().items() if suffix == ""}
    names = source.names()
    claimed = {int(m[1]) for n in names if (m := _NUMBERED.fullmatch(n))}
    tied = _tied({n: None for n in names if _TIED.fullmatch(n)}, [i for i in sorted(files) if i not in claimed],
                 lambda i: ckpt._load(files[i]))  # noqa: SLF001 - the reader's cached file index
    out: dict[int, OrderedDict] = {}
    for name in names:
        info = source.info(name)
        if (m := _NUMBERED.fullmatch(name)) is not None:
            layer, key = int(m[1]), m[2]
        elif name in tied:
            layer, key = tied[name], name.split(".", 2)[2]
        else:
            raise TopologyError(f"parameter {name!r} is neither a numbered layer's nor a tied module's whose layer "
                                f"file {ckpt.tag_dir} holds; a PipelineModule's layer files cannot be written")
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


def _stage_model(source: ArraySource, groups: list[list[str]], topology: Topology, step: int,
                 scheduler: Any) -> dict[str, Any]:
    """A stage's ``mp_rank_SS_model_states.pt``: the module lives in the layer files; ``buffer_names``
    lists the buffers of the stage's numbered layers."""
    shapes = [OrderedDict((n, torch.Size(source.info(n).shape)) for n in names) for names in groups]
    layers = {m[1] for n in source.names() if (m := _NUMBERED.fullmatch(n))}
    buffers = [n for n in source.buffer_names() if (m := _NUMBERED.fullmatch(n)) and m[1] in layers]
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
               storage_options: Mapping[str, Any] | None, verify: bool) -> ReshardReport:
    """Writes the files of the module docstring; every refusal comes before any byte is written.

    Called by one process or every process of a torchrun job: the (stage, dp rank) optimizer files
    are shared out round-robin; process 0 writes the layer and stage files, then ``latest``."""
    start = time.perf_counter()
    if topology.zero != 1:
        raise TopologyError(f"engine='deepspeed' with pp={topology.pp}, zero={topology.zero}: DeepSpeed's "
                            "PipelineEngine runs ZeRO stage 0 or 1 only (it asserts so when it starts), and "
                            "ucp writes ZeRO files: use zero=1")
    ckpt = pipe_checkpoint(source)
    stages = _stages(source, ckpt, topology.pp)
    views = [_Stage(source, names) for names in stages]
    plans = []
    for s, view in enumerate(views):
        try:
            plans.append(plan_groups(view))
        except TopologyError as e:
            raise TopologyError(f"pipeline stage {s}: {e}") from None
    dtype = plans[0][1]
    layers = _layers(source, ckpt, dtype)  # reads weights only; refuses unplaceable names before writing
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
            storage.write(f"{tag}/{stage_model_file(s)}",
                          _torch_bytes(_stage_model(view, plans[s][0], topology, step, scheduler)))
        storage.write(LATEST, tag.encode())
    coord.all_gather_json(None, what="committing the DeepSpeed checkpoint (pipeline)")
    return ReshardReport(dst, name, topology, step, tuple(s * dp + r for s, r in jobs), stats, time.perf_counter() - start)
