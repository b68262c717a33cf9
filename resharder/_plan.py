"""Load plans: what one target rank needs from each universal array, and where it goes.

A plan is pure metadata (frozen dataclasses) computed from parameter names, shapes and states,
the UCL spec applied to the target topology, and the ZeRO partitioning; it never reads data.
:mod:`._read` executes it. Every layout is computed before any I/O, so a topology the model
cannot take fails with a :class:`~ucp.TopologyError` naming the parameter and the constraint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Protocol, Sequence

import torch

from ucp.core._errors import TopologyError, UcpSpecError
from ucp.core._topology import Topology
from ucp.core._params import ParamInfo
from ucp.grammar import ParamLayout, Piece, Spec, load_spec

from ._zero import Region, flat_boxes, group_partition, param_partition

__all__ = ["Catalog", "Copy", "Read", "LocalTensor", "HeldParam", "FlatSegment", "GroupPlan",
           "RankPlan", "plan_rank", "plan_ranks", "param_layouts", "target_spec", "SCALAR_STATES"]

#: Optimizer states that are scalars (not shaped like the parameter): never cut or partitioned.
SCALAR_STATES = frozenset({"step"})
Path = tuple[Any, ...]


class Catalog(Protocol):
    """What planning needs to know about a checkpoint (a universal checkpoint provides it)."""

    def names(self) -> list[str]: ...

    def info(self, name: str) -> ParamInfo: ...

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def buffer_names(self) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class Copy:
    """One box of a universal array into a box of a local tensor.

    The destination tensor, flattened, is viewed as ``view`` starting at element ``offset``;
    ``dst`` is a box of that view (local dim order). The source box ``src`` is in canonical dim
    order; ``array[src].permute(perm)`` (``perm`` from the :class:`Read`) has ``dst``'s shape.
    """

    src: Region
    offset: int
    view: tuple[int, ...]
    dst: Region


@dataclasses.dataclass(frozen=True)
class Read:
    """Copies from one array (one state of a parameter, or a buffer) into one local tensor.

    Attributes:
        name: canonical parameter (or buffer) name.
        state: ``param``, ``fp32``, an optimizer state, or None for a buffer.
        path: where the destination tensor sits in the rank's state dict.
        copies: the boxes to copy; empty with ``whole`` set.
        perm: local dim ``i`` is canonical dim ``perm[i]``.
        whole: copy the whole array as it is (scalar states, buffers).
    """

    name: str
    state: str | None
    path: Path
    copies: tuple[Copy, ...]
    perm: tuple[int, ...] = ()
    whole: bool = False


@dataclasses.dataclass(frozen=True)
class LocalTensor:
    """A tensor of the rank's state, zero-filled then written by :class:`Read` s.

    ``shape`` / ``dtype`` are None when they are those of the stored array (scalar states,
    buffers, optimizer states whose dtype the catalog does not record); ``like`` names the
    array (parameter, state) whose dtype it takes then.
    """

    path: Path
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    like: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class FlatSegment:
    """ZeRO-1/2: the part ``[start, stop)`` of a parameter's flattened local tensor that lies in
    this rank's group partition, at element ``offset`` of the partition."""

    local_name: str
    start: int
    stop: int
    offset: int


@dataclasses.dataclass(frozen=True)
class HeldParam:
    """A parameter this rank holds (a TP shard, a copy, or a ZeRO-3 partition of one).

    Attributes:
        name / local_name: canonical name / the name in this rank's state (PP renumbering).
        shape / local_shape: canonical shape / this rank's TP-local shape (padding included).
        dtype: model dtype.
        group: optimizer param group, None when frozen.
        states: optimizer states loaded for it (``fp32`` masters included when kept).
        partition: ZeRO-3 only: ``(start, stop, partition numel)`` of the flattened local tensor.
    """

    name: str
    local_name: str
    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    dtype: torch.dtype
    group: int | None
    states: tuple[str, ...]
    partition: tuple[int, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """One optimizer param group on this rank.

    Attributes:
        index: the group's index (the same on every rank).
        hyper: its hyper-parameters (lr, betas, ...), as stored.
        params: local names of its parameters held here, in flattening order.
        numel / padded_numel: ZeRO-1/2 flat group size without / with padding (0 otherwise).
        partition: ZeRO-1/2: this rank's ``(start, stop)`` of the padded flat buffer.
        segments: ZeRO-1/2: the parameter pieces inside that partition.
    """

    index: int
    hyper: Mapping[str, Any]
    params: tuple[str, ...]
    numel: int = 0
    padded_numel: int = 0
    partition: tuple[int, int] | None = None
    segments: tuple[FlatSegment, ...] = ()


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """Everything target ``rank`` of ``topology`` loads: tensors to allocate and reads to run.

    ``topology.zero`` picks the layout (see docs/resharding.md); ``alignment`` is the ZeRO
    partition alignment in elements.
    """

    topology: Topology
    rank: int
    alignment: int
    tensors: tuple[LocalTensor, ...]
    reads: tuple[Read, ...]
    params: tuple[HeldParam, ...]
    groups: tuple[GroupPlan, ...]
    buffers: tuple[tuple[str, str], ...] = ()

    @property
    def needed_elements(self) -> int:
        """Elements copied out of shaped arrays (scalar states and buffers not counted)."""
        return sum(_numel(c.src) for r in self.reads for c in r.copies)


def _numel(region: Region) -> int:
    return math.prod(b - a for a, b in region)


# -- specs and layouts --------------------------------------------------------------------------
def target_spec(spec: Spec | str | None, stored: str | None = None,
                stored_constants: Mapping[str, int] | None = None) -> Spec | None:
    """The spec to cut with: ``spec`` (a Spec, bundled name, path or text), else the one stored
    in the universal checkpoint (with its constant overrides), else None."""
    if spec is not None:
        return load_spec(spec)
    if stored:
        return load_spec(stored, constants=dict(stored_constants or {}) or None)
    return None


_NO_SPEC = None


def _no_spec() -> Spec:
    global _NO_SPEC
    if _NO_SPEC is None:
        _NO_SPEC = load_spec("ucl 1\ndefault")  # every parameter whole on every rank
    return _NO_SPEC


def param_layouts(catalog: Catalog, topology: Topology, spec: Spec | None,
                  names: Sequence[str] | None = None) -> dict[str, ParamLayout]:
    """Every parameter's layout on ``topology``; checks the topology fits before any I/O.

    Raises:
        TopologyError: the topology needs a spec, or a parameter does not fit it (names the
            parameter and the constraint, e.g. a dim not divisible by tp).
        UcpSpecError: a parameter no rule of the spec covers.
    """
    if spec is None:
        split = [f"{a}={topology.size(a)}" for a in ("tp", "pp", "ep", "sp") if topology.size(a) > 1]
        if split:
            raise TopologyError(f"target topology {topology} has {', '.join(split)}, so each "
                                "parameter's cut must come from a UCL spec; pass spec= (--spec), "
                                "or convert with one so the universal checkpoint stores it")
        spec = _no_spec()
    out = {}
    for name in catalog.names() if names is None else names:
        if spec.match(name) is None:
            raise UcpSpecError(f"parameter {name!r} matches no rule of {spec.source}; add a "
                               "`param` rule for it, or a `default` rule")
        shape = catalog.info(name).shape
        try:
            out[name] = spec.layout(name, shape, topology)
        except UcpSpecError as e:
            raise TopologyError(f"target topology {topology} cannot hold parameter {name!r} "
                                f"(shape {list(shape)}): {e}") from e
    return out


# -- copies -------------------------------------------------------------------------------------
def _to_global(piece: Piece, box: Region, perm: tuple[int, ...]) -> Region:
    """The canonical box that local box ``box`` (inside ``piece.local_region``) holds."""
    out: list[tuple[int, int]] = [(0, 0)] * len(perm)
    for i, p in enumerate(perm):
        g0 = piece.global_region[p][0] + box[i][0] - piece.local_region[i][0]
        out[p] = (g0, g0 + box[i][1] - box[i][0])
    return tuple(out)


def _intersect(a: Region, b: Region) -> Region | None:
    out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return out if all(lo < hi for lo, hi in out) else None


def shaped_copies(layout: ParamLayout, rank: int) -> tuple[Copy, ...]:
    """Copies filling ``rank``'s whole local tensor (TP cut, padding left zero)."""
    view = layout.local_shape(rank)
    return tuple(Copy(p.global_region, 0, view, p.local_region) for p in layout.pieces(rank)
                 if p.numel)


def flat_copies(layout: ParamLayout, rank: int, start: int, stop: int, offset: int) -> tuple[Copy, ...]:
    """Copies filling flat elements ``[start, stop)`` of ``rank``'s flattened local tensor into a
    flat destination starting at element ``offset``."""
    shape = layout.local_shape(rank)
    pieces = layout.pieces(rank)
    out = []
    for box, first in flat_boxes(shape, start, stop):
        view = tuple(b - a for a, b in box)
        for piece in pieces:
            inter = _intersect(box, piece.local_region)
            if inter is None:
                continue
            dst = tuple((a - b0, b - b0) for (a, b), (b0, _) in zip(inter, box))
            out.append(Copy(_to_global(piece, inter, layout.perm), offset + first - start, view, dst))
    return tuple(out)


# -- the planner --------------------------------------------------------------------------------
def _optimizer_states(info: ParamInfo, masters: bool | None) -> tuple[str, ...]:
    """The optimizer states loaded for a parameter; ``fp32`` masters only when they differ from
    the weights (a low-precision model) unless ``masters`` says otherwise."""
    if info.frozen or info.group is None:
        return ()
    keep = info.dtype != torch.float32 if masters is None else masters
    return tuple(s for s in info.states if s != "param" and (s != "fp32" or keep))


def _state_dtype(state: str) -> torch.dtype | None:
    return torch.float32 if state == "fp32" else None


@dataclasses.dataclass
class _Builder:
    """Accumulates one rank's tensors and reads (mutable while planning, frozen after)."""

    tensors: dict[Path, LocalTensor] = dataclasses.field(default_factory=dict)
    reads: list[Read] = dataclasses.field(default_factory=list)

    def add(self, path: Path, shape: tuple[int, ...] | None, dtype: torch.dtype | None,
            read: Read | None, like: tuple[str, str] | None = None) -> None:
        if like is None and read is not None and read.state is not None:
            like = (read.name, read.state)
        self.tensors.setdefault(path, LocalTensor(path, shape, dtype, like))
        if read is not None:
            self.reads.append(read)


def _plan_param(b: _Builder, name: str, info: ParamInfo, layout: ParamLayout, rank: int,
                masters: bool | None, alignment: int) -> HeldParam:
    """Weights, scalar states, and (zero 0 / 3) per-parameter optimizer states of one parameter."""
    topo = layout.topology
    local, lshape = layout.local_name(rank), layout.local_shape(rank)
    states = _optimizer_states(info, masters)
    partition = None
    if topo.zero == 3:
        start, stop, part = param_partition(math.prod(lshape), topo.dp, topo.coords(rank)["dp"],
                                            alignment)
        partition, shape = (start, stop, part), (part,)
        copies = flat_copies(layout, rank, start, stop, 0)
    else:
        shape, copies = lshape, shaped_copies(layout, rank)
    path = ("model", local)
    b.add(path, shape, info.dtype, Read(name, "param", path, copies, layout.perm))
    for state in states:
        path = ("optim", "state", local, state)
        if state in SCALAR_STATES:
            b.add(path, None, None, Read(name, state, path, (), whole=True))
        elif topo.zero in (0, 3):
            b.add(path, shape, _state_dtype(state), Read(name, state, path, copies, layout.perm))
    return HeldParam(name, local, tuple(info.shape), lshape, info.dtype, info.group, states, partition)


def _plan_flat_group(b: _Builder, index: int, hyper: Mapping[str, Any], members: list[HeldParam],
                     layouts: Mapping[str, ParamLayout], rank: int, alignment: int) -> GroupPlan:
    """ZeRO-1/2: this rank's partition of one flat param group, for every shaped state."""
    if not members:
        return GroupPlan(index, hyper, (), 0, 0, (0, 0), ())
    topo = layouts[members[0].name].topology
    part = group_partition([math.prod(m.local_shape) for m in members], topo.dp,
                           topo.coords(rank)["dp"], alignment)
    states = [s for m in members for s in m.states if s not in SCALAR_STATES]
    for state in dict.fromkeys(states):
        like = next(m.name for m in members if state in m.states)
        b.add(("optim", "flat", index, state), (part.partition_numel,), _state_dtype(state), None,
              like=(like, state))
    segments = []
    for i, start, stop in part.overlaps():
        m, offset = members[i], part.offsets[i] + start - part.start
        segments.append(FlatSegment(m.local_name, start, stop, offset))
        layout = layouts[m.name]
        copies = flat_copies(layout, rank, start, stop, offset)
        for state in m.states:
            if state not in SCALAR_STATES:
                b.reads.append(Read(m.name, state, ("optim", "flat", index, state), copies, layout.perm))
    return GroupPlan(index, hyper, tuple(m.local_name for m in members), part.numel,
                     part.padded_numel, (part.start, part.stop), tuple(segments))


def plan_rank(catalog: Catalog, topology: Topology, rank: int, *, spec: Spec | None = None,
              alignment: int = 1, masters: bool | None = None,
              layouts: Mapping[str, ParamLayout] | None = None) -> RankPlan:
    """The load plan of target ``rank`` of ``topology`` (``topology.zero`` picks the layout).

    Args:
        catalog: the checkpoint's parameters (a universal checkpoint, or a source adapter).
        topology: the target topology, ZeRO stage included.
        rank: the target rank.
        spec: how parameters are cut over tp/pp/ep (None: every parameter whole on every rank,
            which needs tp = pp = ep = sp = 1).
        alignment: ZeRO partitions hold a multiple of this many elements.
        masters: load ``fp32`` master weights as an optimizer state; default: only for
            low-precision models (an fp32 model's masters are its weights).
        layouts: precomputed :func:`param_layouts` (planning many ranks).

    Raises:
        TopologyError: the model cannot take ``topology`` (names the parameter and constraint),
            or ``rank`` is outside it.

    Example:
        >>> plan = plan_rank(ucp.open("universal/"), ucp.Topology.parse("dp=2,zero=1"), 1)
        >>> [t.path for t in plan.tensors][:2]
        [('model', 'emb.weight'), ('model', 'up.weight')]
    """
    topology.coords(rank)
    if layouts is None:
        layouts = param_layouts(catalog, topology, spec)
    b = _Builder()
    held: list[HeldParam] = []
    for name in catalog.names():
        layout = layouts[name]
        if layout.holds(rank):
            held.append(_plan_param(b, name, catalog.info(name), layout, rank, masters, alignment))
    buffers = _plan_buffers(b, catalog, topology, rank, spec)
    groups = []
    for index, group in enumerate(catalog.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        members = [h for h in held if h.group == index]
        if topology.zero in (1, 2):
            groups.append(_plan_flat_group(b, index, hyper, members, layouts, rank, alignment))
        else:
            groups.append(GroupPlan(index, hyper, tuple(m.local_name for m in members)))
    return RankPlan(topology, rank, alignment, tuple(b.tensors.values()), tuple(b.reads),
                    tuple(held), tuple(groups), buffers)


def _plan_buffers(b: _Builder, catalog: Catalog, topology: Topology, rank: int,
                  spec: Spec | None) -> tuple[tuple[str, str], ...]:
    """Buffers go whole to every rank of the stage a spec rule places them on (every rank when
    no rule matches them)."""
    out = []
    for name in catalog.buffer_names():
        local = name
        if spec is not None and spec.match(name) is not None:
            local = spec.local_name(name, topology, rank)
            if local is None:
                continue
        path = ("model", local)
        b.add(path, None, None, Read(name, None, path, (), whole=True))
        out.append((name, local))
    return tuple(out)


def plan_ranks(catalog: Catalog, topology: Topology, *, spec: Spec | None = None,
               alignment: int = 1, masters: bool | None = None,
               ranks: Sequence[int] | None = None) -> list[RankPlan]:
    """:func:`plan_rank` for ``ranks`` (default: every rank), layouts computed once."""
    layouts = param_layouts(catalog, topology, spec)
    return [plan_rank(catalog, topology, r, spec=spec, alignment=alignment, masters=masters,
                      layouts=layouts)
            for r in (range(topology.world_size) if ranks is None else ranks)]
