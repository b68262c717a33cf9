"""Loading a checkpoint straight into a live DeepSpeed ZeRO-1/2 engine, on any data-parallel size.

The engine's own layout is the plan: each flat parameter group is laid end to end (per-parameter
alignment padding included), padded and split over the data-parallel ranks exactly as DeepSpeed
does (:func:`ucp.resharder.group_partition`); this rank's partition says which flat range of which
parameters it holds, and those ranges are read from the source (``fp32`` masters and every
optimizer state) directly into the engine's fp32 partition and its optimizer's state tensors.
The bf16/fp16 module weights, frozen parameters and buffers are whole on every rank, and are read
whole. No DeepSpeed checkpoint files are written and ``engine.load_checkpoint`` is not called.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ucp.core._errors import StateError
from ._snapshot import _dp_rank_and_size, _zero_parts
from ucp.resharder import flat_boxes, group_partition

__all__ = ["load_engine"]

#: DeepSpeed aligns ZeRO-1/2 flat groups to this many elements per data-parallel rank.
ALIGNMENT = 2


def load_engine(engine: Any, source: Any) -> None:
    """Loads ``source`` (a conversion source naming parameters as ``engine.module`` does) into
    ``engine``: weights, fp32 master partitions, optimizer states, step and hyper-parameters.

    Each rank calls it for itself (no collective) and reads only its own partition of the
    masters and optimizer states, plus the module tensors it holds whole.

    Raises:
        StateError: the engine's model does not match the source (names the parameter).
        UcpError: an engine layout other than ZeRO-1/2 data parallelism.
    """
    fp32, _group_pads, param_pads, _stage = _zero_parts(engine)
    dp_rank, dp = _dp_rank_and_size(engine)
    shapes = engine._get_zero_param_shapes()  # noqa: SLF001 - the flat groups' order, as DeepSpeed saves it
    base = engine.optimizer.optimizer
    for g, group in enumerate(shapes):
        pads = param_pads[g] if param_pads is not None else None
        _load_group(source, fp32[g], base, list(group.items()), pads, dp, dp_rank, g)
    stored = source.param_groups()
    if len(stored) != len(base.param_groups):
        raise StateError(f"the engine's optimizer has {len(base.param_groups)} param groups, the "
                         f"checkpoint {len(stored)}; build the optimizer with the same groups")
    for group, saved in zip(base.param_groups, stored):
        group.update({k: v for k, v in saved.items() if k != "params"})
    _load_module(engine, source)


def _load_group(source: Any, flat: torch.Tensor, base: Any, params: list[tuple[str, Any]],
                pads: list[int] | None, dp: int, dp_rank: int, g: int) -> None:
    """This rank's partition of flat group ``g``: masters and optimizer states, range by range."""
    part = group_partition([math.prod(s) for _, s in params], dp, dp_rank, ALIGNMENT, pads)
    if part.partition_numel != flat.numel():
        raise StateError(f"flat group {g}: this engine's partition holds {flat.numel()} elements, the "
                         f"layout computed from its parameters {part.partition_numel}; unsupported "
                         "DeepSpeed layout (is it ZeRO-1/2 with DeepSpeed's default alignment?)")
    names = [n for n, _ in params]
    for name, shape in params:
        _check(source, name, tuple(shape))
    state = base.state.setdefault(flat, {})
    states = [s for s in source.info(names[0]).states if s not in ("param", "fp32")]
    targets = {"fp32": flat.detach()}
    for s in states:
        if s not in state or state[s].shape != flat.shape:
            state[s] = torch.zeros_like(flat.detach())
        targets[s] = state[s]
    if source.step is not None:
        state["step"] = torch.tensor(float(source.step))
    with torch.no_grad():
        for i, lo, hi in part.overlaps():
            for box, first in flat_boxes(params[i][1], lo, hi):
                at = part.offsets[i] + first - part.start
                n = math.prod(b - a for a, b in box)
                for s, t in targets.items():
                    t[at:at + n].copy_(source.read(names[i], s, box).reshape(-1))


def _check(source: Any, name: str, shape: tuple[int, ...]) -> None:
    try:
        have = tuple(source.info(name).shape)
    except KeyError as e:
        raise StateError(f"the checkpoint has no parameter {name!r} of the engine's model; is it the "
                         "same model?") from e
    if have != shape:
        raise StateError(f"{name!r}: the engine's model has shape {list(shape)}, the checkpoint "
                         f"{list(have)}; is it the same model?")


def _load_module(engine: Any, source: Any) -> None:
    """Module weights (trainable and frozen) and buffers, whole, into the live tensors."""
    names, aliases = set(source.names()), dict(getattr(source, "aliases", dict)())
    buffers = source.buffers()
    with torch.no_grad():
        for key, live in engine.module.state_dict().items():
            name = aliases.get(key, key)
            if name in names:
                _check(source, name, tuple(live.shape))
                live.copy_(source.read(name, "param"))
            elif key in buffers:
                live.copy_(buffers[key])
            else:
                raise StateError(f"the checkpoint has no {key!r} of the engine's module; is it the same "
                                 "model?")
