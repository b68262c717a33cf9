"""What a checkpoint says about one parameter (:class:`ParamInfo`) and a box of a global tensor
(:data:`Region`): the vocabulary every source, planner and target shares. Imports torch (for
dtypes), never torch.distributed."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["ParamInfo", "Region"]

#: A box of a global tensor: ``(start, stop)`` per dimension.
Region = tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """A consolidated parameter as a source checkpoint describes it.

    Attributes:
        shape: global shape.
        dtype: the model dtype (of state ``param``).
        states: the states it has: ``param`` (model dtype), ``fp32`` (master weights) and
            optimizer states such as ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``.
        frozen: True for parameters without gradients (no optimizer states).
        group: index of its optimizer param group, or None.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    states: tuple[str, ...]
    frozen: bool = False
    group: int | None = None
