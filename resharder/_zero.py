"""ZeRO partition math: flat ranges of row-major tensors, group and per-parameter partitions.

Everything here is pure integer arithmetic on shapes; nothing reads data. A flat range of a
tensor is decomposed into a few boxes that are each contiguous in row-major order, so a plan can
say "this box of the canonical array goes to these consecutive elements of a flat partition".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from ucp.core._errors import TopologyError

__all__ = ["Region", "flat_boxes", "round_up", "GroupPartition", "group_partition",
           "param_partition"]

#: A box: ``(start, stop)`` per dim.
Region = tuple[tuple[int, int], ...]


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n``."""
    return -(-n // multiple) * multiple


def flat_boxes(shape: Sequence[int], start: int, stop: int) -> list[tuple[Region, int]]:
    """Boxes of a row-major tensor of ``shape`` that together hold flat elements ``[start, stop)``.

    Each box is itself contiguous in row-major order (a run of single indices, then one partial
    dim, then whole trailing dims), so it maps onto consecutive elements of a flat buffer. At
    most ``2 * ndim - 1`` boxes, in flat order.

    Returns:
        ``(box, flat index of the box's first element)`` pairs.

    Example:
        >>> flat_boxes((3, 4), 2, 11)
        [(((0, 1), (2, 4)), 2), (((1, 2), (0, 4)), 4), (((2, 3), (0, 3)), 8)]
    """
    shape = tuple(int(s) for s in shape)
    total = math.prod(shape)
    if not 0 <= start <= stop <= total:
        raise ValueError(f"flat range [{start}, {stop}) is outside a tensor of {total} elements")
    if start == stop:
        return []
    if not shape:
        return [((), 0)]
    inner = math.prod(shape[1:])
    full = tuple((0, s) for s in shape[1:])
    first_full, end_full = -(-start // inner), stop // inner  # whole rows [first_full, end_full)
    if first_full > end_full:  # start and stop fall inside one row
        row = start // inner
        return _prefixed(row, inner, flat_boxes(shape[1:], start - row * inner, stop - row * inner))
    out: list[tuple[Region, int]] = []
    if start < first_full * inner:
        row = first_full - 1
        out += _prefixed(row, inner, flat_boxes(shape[1:], start - row * inner, inner))
    if first_full < end_full:
        out.append((((first_full, end_full),) + full, first_full * inner))
    if end_full * inner < stop:
        out += _prefixed(end_full, inner, flat_boxes(shape[1:], 0, stop - end_full * inner))
    return out


def _prefixed(row: int, inner: int, boxes: list[tuple[Region, int]]) -> list[tuple[Region, int]]:
    return [(((row, row + 1),) + box, row * inner + f) for box, f in boxes]


@dataclasses.dataclass(frozen=True)
class GroupPartition:
    """One rank's partition of a ZeRO-1/2 flat parameter group.

    The group's parameters (their flattened local tensors, in group order) are laid end to end,
    the total is padded with zeros to a multiple of ``alignment * dp``, and the result is split
    into ``dp`` equal partitions; dp rank ``i`` holds ``[start, stop)``.

    Attributes:
        offsets: where each parameter starts in the flat group buffer.
        numels: each parameter's element count.
        numel: the group's element count without padding.
        padded_numel: with padding (``partition_numel * dp``).
        start, stop: this rank's partition of the padded buffer.
    """

    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    numel: int
    padded_numel: int
    start: int
    stop: int

    @property
    def partition_numel(self) -> int:
        return self.stop - self.start

    def overlaps(self) -> list[tuple[int, int, int]]:
        """``(parameter index, start, stop)`` of each parameter's flat elements in this partition."""
        out = []
        for i, (off, n) in enumerate(zip(self.offsets, self.numels)):
            lo, hi = max(off, self.start), min(off + n, self.stop)
            if lo < hi:
                out.append((i, lo - off, hi - off))
        return out


def _check(dp: int, alignment: int) -> None:
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1:
        raise TopologyError(f"alignment={alignment!r}: a ZeRO partition alignment must be a "
                            "positive number of elements (DeepSpeed ZeRO-1/2 uses 2)")
    if dp < 1:
        raise TopologyError(f"dp={dp}: the data-parallel size must be positive")


def group_partition(numels: Sequence[int], dp: int, dp_rank: int, alignment: int = 1,
                    paddings: Sequence[int] | None = None) -> GroupPartition:
    """The partition of dp rank ``dp_rank`` of a flat group of parameters with ``numels``
    (``paddings``: zeros after each parameter, as DeepSpeed's round-robin groups align them).

    Example:
        >>> p = group_partition([6, 5], dp=2, dp_rank=1, alignment=2)
        >>> p.padded_numel, (p.start, p.stop), p.overlaps()
        (12, (6, 12), [(1, 0, 5)])
    """
    _check(dp, alignment)
    offsets, total = [], 0
    pads = list(paddings) if paddings is not None else [0] * len(numels)
    if len(pads) != len(numels):
        raise TopologyError(f"{len(pads)} paddings for {len(numels)} parameters of a flat group")
    for n, pad in zip(numels, pads):
        offsets.append(total)
        total += int(n) + int(pad)
    padded = round_up(total, alignment * dp)
    part = padded // dp
    return GroupPartition(tuple(offsets), tuple(int(n) for n in numels), total, padded,
                          dp_rank * part, (dp_rank + 1) * part)


def param_partition(numel: int, dp: int, dp_rank: int, alignment: int = 1) -> tuple[int, int, int]:
    """ZeRO-3: ``(start, stop, partition numel)`` of dp rank ``dp_rank``'s share of one parameter.

    The flattened parameter is padded to ``dp`` partitions of ``ceil(numel / dp)`` elements,
    rounded up to ``alignment``; ``[start, stop)`` is the part of the real (unpadded) elements
    this rank holds, possibly empty.

    Example:
        >>> param_partition(10, dp=4, dp_rank=3)
        (9, 10, 3)
    """
    _check(dp, alignment)
    part = round_up(-(-numel // dp), alignment) if numel else 0
    start = min(numel, dp_rank * part)
    return start, min(numel, start + part), part
