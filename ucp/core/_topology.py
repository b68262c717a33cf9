"""Parallel topologies: axis sizes, the ZeRO stage, and rank <-> coordinate maps."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

from ucp.core._errors import TopologyError

__all__ = ["Topology", "AXES"]

#: Parallel axes, fastest-varying first: consecutive ranks differ in their ``tp`` coordinate,
#: as in Megatron-LM and DeepSpeed (tensor parallel peers sit next to each other on a node).
AXES: tuple[str, ...] = ("tp", "sp", "ep", "dp", "pp")

_ITEM = re.compile(r"^\s*([a-z]+)\s*=\s*(\d+)\s*$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """Sizes of each parallel axis plus the ZeRO stage.

    The world size is the product of every axis size. Rank ``r`` has coordinates
    ``coords(r)`` with ``tp`` varying fastest and ``pp`` slowest.

    Example:
        >>> t = Topology.parse("dp=2,tp=2,pp=1,zero=1")
        >>> t.world_size, t.coords(3)["dp"], str(t)
        (4, 1, 'dp=2,tp=2,pp=1,zero=1')
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    sp: int = 1
    zero: int = 0

    def __post_init__(self) -> None:
        for axis in AXES:
            size = getattr(self, axis)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise TopologyError(f"topology axis {axis}={size!r} must be a positive integer")
        if self.zero not in (0, 1, 2, 3):
            raise TopologyError(f"zero={self.zero!r}: the ZeRO stage must be 0, 1, 2 or 3")

    @classmethod
    def parse(cls, text: str) -> Topology:
        """Parses ``"dp=2,tp=2,pp=1,zero=1"``; omitted axes are 1 and ``zero`` is 0.

        Raises:
            TopologyError: on an unknown key, a repeated key or a non-positive size.
        """
        if not isinstance(text, str) or not text.strip():
            raise TopologyError(f"empty topology {text!r}; expected e.g. 'dp=2,tp=2,pp=1,zero=1'")
        values: dict[str, int] = {}
        for item in text.split(","):
            match = _ITEM.match(item)
            if match is None:
                raise TopologyError(f"cannot parse {item.strip()!r} in topology {text!r}; "
                                    "expected KEY=INT, e.g. 'dp=2,tp=2'")
            key, value = match.group(1), int(match.group(2))
            if key not in AXES and key != "zero":
                raise TopologyError(f"unknown axis {key!r} in topology {text!r}; "
                                    f"known: {', '.join(AXES)}, zero")
            if key in values:
                raise TopologyError(f"axis {key!r} given twice in topology {text!r}")
            values[key] = value
        return cls(**values)

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> Topology:
        """Builds a topology from :meth:`to_dict` output (unknown keys are an error)."""
        unknown = set(data) - set(AXES) - {"zero"}
        if unknown:
            raise TopologyError(f"unknown topology keys {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in data.items()})

    def to_dict(self) -> dict[str, int]:
        return {"dp": self.dp, "tp": self.tp, "pp": self.pp, "ep": self.ep, "sp": self.sp,
                "zero": self.zero}

    def __str__(self) -> str:
        parts = [f"dp={self.dp}", f"tp={self.tp}", f"pp={self.pp}"]
        parts += [f"{axis}={getattr(self, axis)}" for axis in ("ep", "sp") if getattr(self, axis) != 1]
        return ",".join(parts + [f"zero={self.zero}"])

    @property
    def world_size(self) -> int:
        return math.prod(getattr(self, axis) for axis in AXES)

    def size(self, axis: str) -> int:
        """The size of ``axis`` (one of :data:`AXES`)."""
        if axis not in AXES:
            raise TopologyError(f"unknown axis {axis!r}; known: {', '.join(AXES)}")
        return getattr(self, axis)

    def coords(self, rank: int) -> dict[str, int]:
        """The coordinates of ``rank`` on every axis."""
        if not 0 <= rank < self.world_size:
            raise TopologyError(f"rank {rank} is outside topology {self} "
                                f"(world size {self.world_size})")
        out = {}
        for axis in AXES:
            size = getattr(self, axis)
            out[axis] = rank % size
            rank //= size
        return out

    def rank(self, **coords: int) -> int:
        """The rank at the given coordinates (omitted axes are 0)."""
        unknown = set(coords) - set(AXES)
        if unknown:
            raise TopologyError(f"unknown axes {sorted(unknown)}; known: {', '.join(AXES)}")
        rank, stride = 0, 1
        for axis in AXES:
            size, c = getattr(self, axis), coords.get(axis, 0)
            if not 0 <= c < size:
                raise TopologyError(f"{axis}={c} is outside topology {self}")
            rank += c * stride
            stride *= size
        return rank

    def group(self, rank: int, axis: str) -> list[int]:
        """The ranks that share every coordinate with ``rank`` except along ``axis``."""
        coords = self.coords(rank)
        return [self.rank(**{**coords, axis: i}) for i in range(self.size(axis))]
