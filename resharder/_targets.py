"""Reshard targets: engines a universal checkpoint can be laid out for on disk.

A target is an object with a ``name``, a ``default_alignment`` and
``write(source, dst, *, topology, spec, alignment, step, overwrite, storage_options, workers,
progress) -> ReshardReport``. An engine registers one with :func:`register_target`, or its
``ucp.engines`` plugin carries one as the attribute ``reshard_target`` (ucp's own native layout:
:class:`ucp.native._target.NativeTarget`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

from ucp.core._errors import ConvertError
from ucp.core._topology import Topology
from ucp.grammar import Spec

from ._read import ReadStats
from ._source import ArraySource

__all__ = ["ReshardReport", "ReshardTarget", "register_target", "get_target"]

@dataclasses.dataclass(frozen=True)
class ReshardReport:
    """What :func:`ucp.reshard` wrote.

    Attributes:
        url: the destination.
        engine: the target engine.
        topology: the target topology.
        step: the step written.
        ranks: target ranks written by this process.
        stats: reads of this process (``stats.amplification``: bytes read / bytes needed).
        seconds: wall time.
        world_size: the ranks of the job that loads it, where the engine counts them otherwise
            than ``topology.world_size`` (DeepSpeed's experts: ep cuts dp, it does not multiply it).
    """

    url: str
    engine: str
    topology: Topology
    step: int
    ranks: tuple[int, ...]
    stats: ReadStats
    seconds: float
    world_size: int | None = None

    @property
    def job_ranks(self) -> int:
        """How many ranks the loading job has."""
        return self.world_size if self.world_size is not None else self.topology.world_size


class ReshardTarget(Protocol):
    name: str
    default_alignment: int

    def write(self, source: ArraySource, dst: str, *, topology: Topology, spec: Spec | None,
              alignment: int, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, workers: int,
              progress: bool, verify: bool = False) -> ReshardReport: ...


_TARGETS: dict[str, ReshardTarget] = {}


def register_target(target: ReshardTarget) -> None:
    """Makes ``target`` available as ``ucp.reshard(..., engine=target.name)``."""
    _TARGETS[target.name] = target


def get_target(name: str) -> ReshardTarget:
    """The reshard target called ``name`` (registered, or an engine plugin's ``reshard_target``).

    Raises:
        ConvertError: no such target (lists the known ones).
    """
    if name in _TARGETS:
        return _TARGETS[name]
    from ucp.engines._registry import get_engine

    known = ", ".join(sorted(_TARGETS))
    try:
        target = getattr(get_engine(name), "reshard_target", None)
    except ConvertError as e:
        raise ConvertError(f"no reshard target {name!r} (known: {known}): {e}") from e
    if target is None:
        raise ConvertError(f"engine {name!r} cannot be a reshard target yet (its plugin has no "
                           f"reshard_target); known targets: {known}")
    return target
