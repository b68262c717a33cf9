"""Layouts: which region of a parameter's canonical tensor each rank holds, and where.

This is the core of a spec, and it moves no data: a :class:`ParamLayout` answers, for any rank,
the list of :class:`Piece` s (a box of the canonical tensor -> a box of the rank's local tensor),
so that a converter or resharder reads exactly the bytes it needs. :mod:`._tensor` builds
``cut``/``consolidate`` on top of it.

Each canonical dim is cut independently (a :class:`DimLayout`); a rank's pieces are the
Cartesian product of its segments along every dim. Local positions covered by no piece are
padding (zero when cutting, ignored when consolidating).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Mapping

from ucp.core._errors import UcpSpecError
from ucp.core._topology import AXES as _TOPOLOGY_AXES
from ucp.core._topology import Topology

from ._resolve import Located, SplitOp

__all__ = ["Piece", "DimLayout", "ParamLayout", "dim_layout", "iter_ranks", "inverse"]

Segment = tuple[int, int, int]  # canonical start, canonical stop, local start


@dataclasses.dataclass(frozen=True)
class Piece:
    """A box of the canonical tensor and the box of a rank's local tensor that holds it.

    Attributes:
        global_region: ``(start, stop)`` per canonical dim.
        local_region: ``(start, stop)`` per local dim. Local dim ``i`` is canonical dim
            ``perm[i]`` of the layout, so with a transpose the two regions list their dims in a
            different order; the box holds ``canonical[global_region].permute(perm)``.
    """

    global_region: tuple[tuple[int, int], ...]
    local_region: tuple[tuple[int, int], ...]

    @property
    def numel(self) -> int:
        n = 1
        for start, stop in self.global_region:
            n *= stop - start
        return n


@dataclasses.dataclass(frozen=True)
class DimLayout:
    """How one canonical dim is cut into shards.

    Attributes:
        size: canonical (unpadded) length.
        axes: the axes that split it, outer first; ``()`` when every rank holds all of it.
        shards: for each shard index (see :meth:`ParamLayout.shard`), its segments
            ``(canonical start, canonical stop, local start)`` in local order.
        local_sizes: local length of each shard, padding included.
        padded_size: length including padding (``size`` when there is none).
    """

    size: int
    axes: tuple[str, ...]
    shards: tuple[tuple[Segment, ...], ...]
    local_sizes: tuple[int, ...]
    padded_size: int


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """How one parameter is laid out over one topology (the same for every state).

    Attributes:
        name: canonical name.
        rule: the rule that matched, e.g. ``param "layers.{layer}.w" (line 7)``.
        global_shape: canonical shape (no padding).
        topology: the topology laid out on.
        dims: one :class:`DimLayout` per canonical dim.
        perm: local dim ``i`` is canonical dim ``perm[i]`` (identity without a transpose).
        placement: for each axis that holds the parameter at some coordinates only (pipeline
            stages, an ``index`` over ep, ...), those coordinates; on a replicated axis the
            first one listed is where consolidation takes the reference copy from.
        policies: for each axis over which ranks hold copies (every axis that neither splits
            nor indexes the parameter), how copies consolidate: ``check`` (must be equal),
            ``average`` or ``first`` (take the copy at the first coordinate, unread otherwise).
        stage_names: local name of the parameter on each pipeline stage that holds it.
    """

    name: str
    rule: str
    global_shape: tuple[int, ...]
    topology: Topology
    dims: tuple[DimLayout, ...]
    perm: tuple[int, ...]
    placement: tuple[tuple[str, tuple[int, ...]], ...]
    policies: tuple[tuple[str, str], ...]
    stage_names: tuple[tuple[int, str], ...]

    # -- who holds it ---------------------------------------------------------------------
    def coordinates(self, axis: str) -> tuple[int, ...]:
        """The coordinates of ``axis`` at which ranks hold the parameter."""
        for a, coords in self.placement:
            if a == axis:
                return coords
        return tuple(range(self.topology.size(axis)))

    def holds(self, rank: int) -> bool:
        """Whether ``rank`` holds (a shard or a copy of) the parameter."""
        coords = self.topology.coords(rank)
        return all(coords[a] in allowed for a, allowed in self.placement)

    def ranks(self) -> tuple[int, ...]:
        """Every rank that holds the parameter, in increasing order."""
        return tuple(sorted(self._ranks({})))

    def local_name(self, rank: int) -> str:
        """The name ``rank`` stores the parameter under (renumbered, renamed)."""
        self._require(rank)
        return dict(self.stage_names)[self.topology.coords(rank)["pp"]]

    def policy(self, axis: str) -> str | None:
        """The consolidation policy of a replicated ``axis``, None when it splits or indexes."""
        return dict(self.policies).get(axis)

    def sources(self) -> tuple[int, ...]:
        """The ranks whose pieces make up the consolidated tensor: on every replicated axis, the
        first coordinate that holds the parameter. Their pieces tile the canonical tensor."""
        return tuple(sorted(self._ranks({a: self.coordinates(a)[0] for a, _ in self.policies})))

    def needed(self) -> tuple[int, ...]:
        """The ranks whose fragments consolidation reads: the :meth:`sources`, plus their copies
        along every replicated axis whose policy is ``check`` or ``average``."""
        axes = tuple(a for a, p in self.policies if p != "first")
        out: set[int] = set()
        for rank in self.sources():
            out.update(self.replicas(rank, axes))
        return tuple(sorted(out))

    def replicas(self, rank: int, axes: tuple[str, ...]) -> tuple[int, ...]:
        """The holders equal to ``rank`` on every axis except ``axes`` (``rank`` included)."""
        coords = self.topology.coords(rank)
        return tuple(sorted(self._ranks({a: c for a, c in coords.items() if a not in axes})))

    # -- what each rank holds -------------------------------------------------------------
    def shard(self, rank: int) -> tuple[int, ...]:
        """The shard index of ``rank`` along each canonical dim (0 on dims nothing splits)."""
        coords = self.topology.coords(rank)
        out = []
        for dim in self.dims:
            c = 0
            for axis in dim.axes:
                c = c * self.topology.size(axis) + coords[axis]
            out.append(c)
        return tuple(out)

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """The canonical shape with padding, i.e. what concatenating the shards gives."""
        return tuple(d.padded_size for d in self.dims)

    def local_shape(self, rank: int) -> tuple[int, ...]:
        """The shape of ``rank``'s local tensor."""
        self._require(rank)
        canon = [d.local_sizes[c] for d, c in zip(self.dims, self.shard(rank))]
        return tuple(canon[p] for p in self.perm)

    def pieces(self, rank: int) -> tuple[Piece, ...]:
        """The pieces of the canonical tensor ``rank`` holds; the rest of its tensor is padding.

        Raises:
            UcpSpecError: when ``rank`` does not hold the parameter (see :meth:`holds`).
        """
        self._require(rank)
        per_dim = [d.shards[c] for d, c in zip(self.dims, self.shard(rank))]
        out = []
        for segs in itertools.product(*per_dim):
            glob = tuple((g0, g1) for g0, g1, _ in segs)
            canon_local = [(l0, l0 + g1 - g0) for g0, g1, l0 in segs]
            out.append(Piece(glob, tuple(canon_local[p] for p in self.perm)))
        return tuple(out)

    def padding(self, rank: int) -> tuple[tuple[int, int, int], ...]:
        """``(local dim, start, stop)`` for each tail of ``rank``'s tensor that is padding."""
        out = []
        for i, p in enumerate(self.perm):
            dim, c = self.dims[p], self.shard(rank)[p]
            end = max((l0 + g1 - g0 for g0, g1, l0 in dim.shards[c]), default=0)
            if end < dim.local_sizes[c]:
                out.append((i, end, dim.local_sizes[c]))
        return tuple(out)

    # -- helpers --------------------------------------------------------------------------
    def _ranks(self, fixed: Mapping[str, int]) -> Iterator[int]:
        return iter_ranks(self.topology, self.placement, fixed)

    def _require(self, rank: int) -> None:
        if not self.holds(rank):
            where = ", ".join(f"{a} in {list(c)}" for a, c in self.placement)
            raise UcpSpecError(f"rank {rank} ({_coords(self.topology, rank)}) does not hold "
                               f"{self.name!r}; only ranks with {where} do ({self.rule})")


def iter_ranks(topology: Topology, placement: tuple[tuple[str, tuple[int, ...]], ...],
               fixed: Mapping[str, int]) -> Iterator[int]:
    """The ranks whose coordinates are in ``placement`` and equal ``fixed`` where given."""
    allowed = dict(placement)
    choices = []
    for axis in _TOPOLOGY_AXES:
        values = allowed.get(axis, range(topology.size(axis)))
        choices.append([fixed[axis]] if axis in fixed and fixed[axis] in values else
                       [] if axis in fixed else values)
    for values in itertools.product(*choices):
        yield topology.rank(**dict(zip(_TOPOLOGY_AXES, values)))


def inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    """The inverse permutation: ``t.permute(perm).permute(inverse(perm))`` is ``t``."""
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _coords(topology: Topology, rank: int) -> str:
    coords = topology.coords(rank)
    return ",".join(f"{a}={coords[a]}" for a in _TOPOLOGY_AXES if topology.size(a) > 1) or "-"


# -- one dim ----------------------------------------------------------------------------------
def dim_layout(op: SplitOp | None, size: int, axis_sizes: tuple[int, ...], what: str) -> DimLayout:
    """Cuts one canonical dim of length ``size`` as ``op`` says, over axes of ``axis_sizes``.

    ``what`` names the dim in errors (e.g. ``"dim 0 of 'w'"``).

    Raises:
        Located: when the length does not fit the layout (not divisible, parts that do not sum
            up, a padded size that does not match, ...).
    """
    if op is None:
        return DimLayout(size, (), (((0, size, 0),) if size else (),), (size,), size)
    n = 1
    for s in axis_sizes:
        n *= s
    padded = size
    if op.pad_size is not None:
        padded = _padded(op, size, n, what)
        shards = [_pad_shard(size, padded // n, c) for c in range(n)]
        local = [padded // n] * n
    else:
        shards, local = [], []
        for c in range(n):
            segs = _shard(op, size, n, c, what)
            shards.append(_merge(segs))
            local.append(sum(g1 - g0 for g0, g1, _ in segs))
    return DimLayout(size, op.axes, tuple(shards), tuple(local), padded)


def _axes(op: SplitOp, n: int) -> str:
    return f"{','.join(op.axes)} ({n} shards)"


def _spread(total: int, n: int, c: int, op: SplitOp, what: str) -> tuple[int, int]:
    """Start and length of shard ``c`` of ``n`` over ``total`` elements, in units of ``op.unit``."""
    if total % op.unit:
        raise Located(f"{what} is {total}, not a multiple of the unit {op.unit}", op.pos)
    units = total // op.unit
    base, extra = divmod(units, n)
    if extra and not op.balanced:
        hint = (f"{units} groups do" if op.groups else f"{units} units of {op.unit} do"
                if op.unit > 1 else "it does")
        raise Located(f"{what} is {total}: {hint} not split evenly over {_axes(op, n)}; "
                      "change the topology, or write `balanced` to give the first ranks one "
                      "more", op.pos)
    start = c * base + min(c, extra)
    return start * op.unit, (base + (c < extra)) * op.unit


def _shard(op: SplitOp, size: int, n: int, c: int, what: str) -> list[Segment]:
    if op.groups is not None:
        per_group = sum(op.group_sizes)
        if op.groups * per_group != size:
            raise Located(f"{what} is {size}, but {op.groups} groups of {list(op.group_sizes)} "
                          f"make {op.groups * per_group}", op.pos)
        first, count = _spread(op.groups, n, c, dataclasses.replace(op, unit=1),
                               f"the group count of {what}")
        offsets = list(itertools.accumulate((op.groups * a for a in op.group_sizes), initial=0))
        segs, local = [], 0
        for g in range(first, first + count):
            for off, a in zip(offsets, op.group_sizes):
                segs.append((off + g * a, off + (g + 1) * a, local))
                local += a
        return segs
    if op.equal_parts is not None:
        if size % op.equal_parts:
            raise Located(f"{what} is {size}, not divisible into {op.equal_parts} equal parts",
                          op.pos)
        parts = (size // op.equal_parts,) * op.equal_parts
    elif op.parts is not None:
        parts = op.parts
        if sum(parts) != size:
            raise Located(f"{what} is {size}, but the parts {list(parts)} sum to {sum(parts)}",
                          op.pos)
    else:
        parts = (size,)
    segs, local, offset = [], 0, 0
    for i, part in enumerate(parts):
        label = what if len(parts) == 1 else f"part {i} of {what}"
        start, length = _spread(part, n, c, op, label)
        if length:
            segs.append((offset + start, offset + start + length, local))
        local += length
        offset += part
    return segs


def _padded(op: SplitOp, size: int, n: int, what: str) -> int:
    if op.pad_size != size:
        raise Located(f"{what} is {size}, but the spec says its unpadded size is {op.pad_size}; "
                      "fix the size in `pad SIZE to ...` (or the constant behind it)", op.pos)
    if op.pad_to is not None:
        if op.pad_to % n:
            raise Located(f"{what} is padded to {op.pad_to}, which does not split over "
                          f"{_axes(op, n)}", op.pos)
        return op.pad_to
    step = n * op.pad_multiple
    return -(-size // step) * step


def _pad_shard(size: int, local: int, c: int) -> tuple[Segment, ...]:
    start = c * local
    valid = max(0, min(local, size - start))
    return ((start, start + valid, 0),) if valid else ()


def _merge(segs: list[Segment]) -> tuple[Segment, ...]:
    """Joins segments that are adjacent both in the canonical and in the local tensor."""
    out: list[Segment] = []
    for g0, g1, l0 in segs:
        if g1 == g0:
            continue
        if out and out[-1][1] == g0 and out[-1][2] + out[-1][1] - out[-1][0] == l0:
            out[-1] = (out[-1][0], g1, out[-1][2])
        else:
            out.append((g0, g1, l0))
    return tuple(out)
