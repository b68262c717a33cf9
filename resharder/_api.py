"""One rank's resharded state in memory (the resume hook's entry point)."""

from __future__ import annotations

from typing import Any, Mapping

from ucp.core._topology import Topology
from ucp.grammar import Spec

from ._plan import plan_rank, target_spec
from ._read import read_plan
from ._source import ArraySource, open_array_source
from ._state import build_state

__all__ = ["load_rank_state", "resolve"]


def resolve(src: Any, topology: Topology | str, *, spec: Spec | str | None = None,
            engine: str = "auto", tag: str | None = None,
            storage_options: Mapping[str, Any] | None = None
            ) -> tuple[ArraySource, Topology, Spec | None]:
    """The source to read, the target topology, and the spec to cut with (``spec``, else the one
    the universal checkpoint stores)."""
    topo = Topology.parse(topology) if isinstance(topology, str) else topology
    given = target_spec(spec)
    source = open_array_source(src, engine=engine, spec=given, tag=tag,
                               storage_options=storage_options)
    return source, topo, given or target_spec(None, source.spec_text, source.spec_constants)


def load_rank_state(src: Any, topology: Topology | str, rank: int, *,
                    spec: Spec | str | None = None, alignment: int = 1,
                    masters: bool | None = None, engine: str = "auto", tag: str | None = None,
                    storage_options: Mapping[str, Any] | None = None,
                    workers: int = 8) -> dict[str, Any]:
    """Rank ``rank``'s state on ``topology``, resharded in memory (no files written).

    Called by each rank for itself (no collective); reads only what the rank needs.

    Args:
        src: a universal checkpoint (URL or opened), or any checkpoint ``ucp convert`` reads
            (consolidated parameter by parameter on the fly, nothing written).
        topology: the target topology (``"dp=2,tp=2,zero=1"``); ``zero`` picks the layout.
        rank: the target rank.
        spec: how parameters are cut over tp/pp/ep (default: the one stored in ``src``).
        alignment: ZeRO partitions hold a multiple of this many elements.
        masters: keep ``fp32`` master weights (default: for low-precision models only).
        engine / tag / storage_options: how to open ``src`` (as for ``ucp.convert``).
        workers: reads in flight.

    Returns:
        ``{"model", "optim", "step", "layout"}``, as docs/resharding.md describes per ZeRO stage.

    Raises:
        TopologyError: the model cannot take ``topology``; raised before any tensor is read.

    Example:
        >>> state = load_rank_state("universal/", "dp=2,zero=1", rank=1)
        >>> state["optim"]["flat"][0]["exp_avg"].shape
        torch.Size([2048])
    """
    source, topo, spec_ = resolve(src, topology, spec=spec, engine=engine, tag=tag,
                                  storage_options=storage_options)
    plan = plan_rank(source, topo, rank, spec=spec_, alignment=alignment, masters=masters)
    return build_state(read_plan(plan, source, workers=workers), step=source.step)
