"""The public :class:`Spec`: rules matched to names, layouts, cut/consolidate and name mapping."""

from __future__ import annotations

import bisect
import dataclasses
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from ucp.core._errors import UcpSpecError
from ucp.core._topology import AXES as _TOPOLOGY_AXES
from ucp.core._topology import Topology

from . import _ast as A
from ._bundled import bundled_spec_names, bundled_spec_text
from ._check import Problem, check_spec
from ._error import UclError, error_at
from ._layout import ParamLayout, dim_layout, inverse, iter_ranks
from ._parse import parse
from ._pattern import Pattern
from ._resolve import Index, Located, Resolved, Rule, resolve

if TYPE_CHECKING:  # torch is imported by cut/consolidate only: parsing specs needs none
    import torch

__all__ = ["Spec", "Match", "from_ast", "load_spec", "bundled_spec"]

_PROBE = Topology()  # every axis of size 1: checks what holds on any topology


@dataclasses.dataclass(frozen=True)
class Match:
    """The rule that covers canonical ``name``, and the values of its captures."""

    name: str
    rule: Rule
    captures: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class _Placement:
    placement: tuple[tuple[str, tuple[int, ...]], ...]
    policies: tuple[tuple[str, str], ...]
    stage_names: tuple[tuple[int, str], ...]


@dataclasses.dataclass(frozen=True)
class Spec:
    """A loaded UCL spec: for every parameter, how its canonical tensor is cut over a topology.

    Build one with :func:`load_spec`. Rules are tried in file order and the first whose pattern
    matches a canonical name covers it; the ``default`` rule covers names no rule matches.

    Attributes:
        ast: the syntax tree (text and source included).
        constants: every constant's value, overrides applied.
        indices: the ``index`` declarations, by capture name.
        rules: the ``param`` rules in file order.
        default: the ``default`` rule, or None.
    """

    ast: A.SpecAst
    constants: Mapping[str, int]
    indices: Mapping[str, Index]
    rules: tuple[Rule, ...]
    default: Rule | None
    overrides: Mapping[str, int] = dataclasses.field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.ast.source

    @property
    def text(self) -> str:
        return self.ast.text

    def with_constants(self, constants: Mapping[str, int]) -> Spec:
        """The same spec with some constants overridden (see :func:`load_spec`)."""
        return from_ast(self.ast, {**self.overrides, **constants})

    # -- names ----------------------------------------------------------------------------
    def match(self, name: str) -> Match | None:
        """The first rule (in file order) matching canonical ``name``, else the default, else None."""
        for rule in self.rules:
            captures = rule.pattern.match(name)
            if captures is not None:
                return Match(name, rule, captures)
        return None if self.default is None else Match(name, self.default, {})

    def rule_for(self, name: str) -> Rule:
        """The rule covering canonical ``name``.

        Raises:
            UcpSpecError: when no rule covers it.
        """
        return self._match(name).rule

    def holders(self, name: str, topology: Topology) -> dict[int, str]:
        """Every rank holding canonical ``name`` on ``topology``, with its local name there."""
        placed = self._placement(self._match(name), topology)
        names = dict(placed.stage_names)
        return {r: names[topology.coords(r)["pp"]]
                for r in sorted(iter_ranks(topology, placed.placement, {}))}

    def local_name(self, name: str, topology: Topology, rank: int) -> str | None:
        """The name ``rank`` stores canonical ``name`` under, or None if it does not hold it."""
        placed = self._placement(self._match(name), topology)
        coords = topology.coords(rank)
        if any(coords[a] not in allowed for a, allowed in placed.placement):
            return None
        return dict(placed.stage_names)[coords["pp"]]

    def canonical_name(self, local_name: str, topology: Topology, rank: int) -> str:
        """The canonical name of the parameter ``rank`` stores as ``local_name``.

        Undoes renames and renumbering: on pp stage 1 of ``index {layer} over pp = 8`` with
        pp=2, ``layers.0.w`` is ``layers.4.w``.

        Raises:
            UcpSpecError: when no rule maps ``local_name`` on this rank.
        """
        coords = topology.coords(rank)
        for rule in self.rules:
            for pattern in _local_patterns(rule):
                captures = pattern.match(local_name)
                if captures is None or not self._globalize(rule, captures, topology, coords):
                    continue
                canonical = rule.pattern.format(captures)
                match = self.match(canonical)
                if (match is not None and match.rule is rule
                        and self.local_name(canonical, topology, rank) == local_name):
                    return canonical
        if self.default is not None and self.match(local_name).rule is self.default:
            if self.local_name(local_name, topology, rank) == local_name:
                return local_name
        raise UcpSpecError(f"no rule of {self.source} maps the name {local_name!r} held by rank "
                           f"{rank} of {topology} to a canonical name; add a rule whose pattern "
                           "(or `engine` pattern) matches it")

    # -- layouts and tensors --------------------------------------------------------------
    def layout(self, name: str, global_shape: Sequence[int], topology: Topology) -> ParamLayout:
        """How canonical ``name`` of shape ``global_shape`` is laid out over ``topology``.

        Raises:
            UcpSpecError: when no rule covers ``name`` or the shape does not fit its rule (the
                error names the rule's line, e.g. a split dim not divisible by tp).
        """
        match = self._match(name)
        shape = tuple(int(s) for s in global_shape)
        try:
            placed = self._placement(match, topology)
            perm = self._perm(match.rule, len(shape), name)
            dims = []
            for d, size in enumerate(shape):
                op = next((s for s in match.rule.splits if s.dim == d), None)
                sizes = () if op is None else tuple(topology.size(a) for a in op.axes)
                dims.append(dim_layout(op, size, sizes, f"dim {d} of {name!r}"))
            for op in match.rule.splits:
                if op.dim >= len(shape):
                    raise Located(f"{name!r} has {len(shape)} dims (shape {list(shape)}), so it "
                                  f"has no dim {op.dim} to split", op.pos)
        except Located as e:
            raise error_at(e.message, e.pos or match.rule.pos, self.ast) from e
        return ParamLayout(name, match.rule.describe(), shape, topology, tuple(dims), perm,
                           placed.placement, placed.policies, placed.stage_names)

    def cut(self, name: str, tensor: torch.Tensor, topology: Topology, rank: int) -> torch.Tensor:
        """``rank``'s local tensor of canonical ``name`` (zeros where it holds padding).

        Works for every state (weights, fp32 master copies, optimizer moments) and any dtype.

        Raises:
            UcpSpecError: as :meth:`layout`, or when ``rank`` does not hold the parameter.
        """
        from ._tensor import cut_tensor

        return cut_tensor(self.layout(name, tuple(tensor.shape), topology), tensor, rank)

    def consolidate(self, name: str, fragments: Mapping[int, torch.Tensor], topology: Topology,
                    *, global_shape: Sequence[int] | None = None) -> torch.Tensor:
        """The canonical tensor of ``name`` from the local tensors of ``fragments`` (rank -> tensor).

        Needs the fragments of ``layout.needed()`` (the first copy on each replicated axis, and
        every copy that a ``check`` or ``average`` policy reads); other copies are ignored. The
        canonical shape is inferred from the fragments unless ``global_shape`` is given.

        Raises:
            UcpSpecError: on missing or misshapen fragments, or copies that fail their policy.
        """
        if global_shape is None:
            global_shape = self.infer_shape(name, {r: tuple(t.shape) for r, t in fragments.items()},
                                            topology)
        from ._tensor import consolidate_tensors

        return consolidate_tensors(self.layout(name, global_shape, topology), fragments)

    def infer_shape(self, name: str, local_shapes: Mapping[int, Sequence[int]],
                    topology: Topology) -> tuple[int, ...]:
        """The canonical shape of ``name`` given the local shapes of its holders (rank -> shape).

        A split dim's length is the sum of one shard of each index; a padded dim's length is the
        spec's unpadded size.

        Raises:
            UcpSpecError: when a shard needed to add up a dim is missing.
        """
        match = self._match(name)
        placed = self._placement(match, topology)
        allowed = dict(placed.placement)
        held = {r: tuple(s) for r, s in local_shapes.items()
                if all(topology.coords(r)[a] in allowed[a] for a in allowed)}
        if not held:
            raise UcpSpecError(f"no fragment of {name!r} comes from a rank that holds it on "
                               f"{topology} ({match.rule.describe()})")
        ndim = len(next(iter(held.values())))
        inv = inverse(self._perm_or_raise(match.rule, ndim, name))
        return tuple(self._dim_size(match.rule, d, inv[d], held, topology, name)
                     for d in range(ndim))

    def check(self, params: Mapping[str, Sequence[int]], *,
              topology: Topology | None = None) -> list[Problem]:
        """Lints the spec against a checkpoint's parameters (canonical name -> canonical shape).

        Finds parameters no rule covers, non-optional rules that match nothing, shapes that do
        not fit their rule (a split dim not divisible, fused part sizes that do not sum to the
        dim, a padded size that differs from the dim, a missing dim, ...) and index counts the
        parameters contradict. Without ``topology`` only what holds on every topology is
        checked (all axes of size 1); with it, divisibility on that topology too.

        Returns:
            The problems found, empty when the spec fits.
        """
        return check_spec(self, params, topology)

    # -- helpers --------------------------------------------------------------------------
    def _match(self, name: str) -> Match:
        match = self.match(name)
        if match is None:
            raise UcpSpecError(f"parameter {name!r} matches no rule of {self.source}; add a "
                               "`param` rule for it, or a `default` rule")
        return match

    def _perm(self, rule: Rule, ndim: int, name: str) -> tuple[int, ...]:
        if rule.reverse:
            return tuple(reversed(range(ndim)))
        if rule.perm is None:
            return tuple(range(ndim))
        if len(rule.perm) != ndim:
            raise Located(f"transpose {list(rule.perm)} lists {len(rule.perm)} dims, but "
                          f"{name!r} has {ndim}", rule.pos)
        return rule.perm

    def _perm_or_raise(self, rule: Rule, ndim: int, name: str) -> tuple[int, ...]:
        try:
            return self._perm(rule, ndim, name)
        except Located as e:
            raise error_at(e.message, e.pos, self.ast) from e

    def _dim_size(self, rule: Rule, dim: int, local_dim: int, held: Mapping[int, tuple[int, ...]],
                  topology: Topology, name: str) -> int:
        op = next((s for s in rule.splits if s.dim == dim), None)
        if op is not None and op.pad_size is not None:
            return op.pad_size
        axes = () if op is None else op.axes
        by_shard: dict[int, int] = {}
        for rank, shape in held.items():
            coords = topology.coords(rank)
            shard = 0
            for axis in axes:
                shard = shard * topology.size(axis) + coords[axis]
            by_shard.setdefault(shard, shape[local_dim])
        n = 1
        for axis in axes:
            n *= topology.size(axis)
        missing = [c for c in range(n) if c not in by_shard]
        if missing:
            raise UcpSpecError(f"cannot infer dim {dim} of {name!r}: no fragment for shard(s) "
                               f"{missing} of {n} over {','.join(axes)} ({rule.describe()})")
        return sum(by_shard.values())

    def _globalize(self, rule: Rule, captures: dict[str, str], topology: Topology,
                   coords: Mapping[str, int]) -> bool:
        """Turns local index captures into global ones in place; False when out of range."""
        for ix in rule.indices:
            try:
                starts = ix.starts(topology.size(ix.axis))
            except Located as e:
                raise error_at(e.message, e.pos, self.ast) from e
            c, local = coords[ix.axis], int(captures[ix.capture])
            if local >= starts[c + 1] - starts[c]:
                return False
            captures[ix.capture] = str(starts[c] + local)
        return True

    def _placement(self, match: Match, topology: Topology) -> _Placement:
        try:
            return _place(match, topology)
        except Located as e:
            raise error_at(e.message, e.pos, self.ast) from e



def _local_patterns(rule: Rule) -> list[Pattern]:
    out = [s.alias for s in rule.stage.stages if s.alias is not None] if rule.stage else []
    return out + [rule.engine or rule.pattern]


def _place(match: Match, topology: Topology) -> _Placement:
    """Where ``match``'s parameter lives: constrained coordinates, replica policies, local names."""
    rule, captures = match.rule, dict(match.captures)
    placement: list[tuple[str, tuple[int, ...]]] = []
    for ix in rule.indices:
        value = int(captures[ix.capture])
        if value >= ix.count:
            raise Located(f"{{{ix.capture}}}={value} in {match.name!r} is out of range: "
                          f"the index declares {ix.count} values (0..{ix.count - 1})", ix.pos)
        starts = ix.starts(topology.size(ix.axis))
        coord = bisect.bisect_right(starts, value) - 1
        placement.append((ix.axis, (coord,)))
        captures[ix.capture] = str(value - starts[coord])
    indexed = {ix.axis for ix in rule.indices}
    split = {a for s in rule.splits for a in s.axes}
    replicate = dict(rule.replicate)
    policies = [(a, replicate.get(a, "first")) for a in _TOPOLOGY_AXES
                if a not in indexed and a not in split and a != "pp"]
    local = rule.engine or rule.pattern
    default_name = match.name if local is None else local.format(captures)
    if "pp" in indexed:
        stages = [(dict(placement)["pp"][0], default_name)]
    elif rule.stage is not None:
        stages = _stages(rule, captures, topology, default_name)
        placement.append(("pp", tuple(s for s, _ in stages)))
        if len(stages) > 1:
            policies.append(("pp", rule.stage.policy))
    elif "pp" in replicate or topology.pp == 1:
        stages = [(s, default_name) for s in range(topology.pp)]
        policies.append(("pp", replicate.get("pp", "first")))
    else:
        raise Located(f"{rule.describe()} gives {match.name!r} no pipeline stage, and "
                      f"pp={topology.pp}: add `stage first`, `stage last`, `stage first, last` "
                      "(tied copies) or `replicate pp`, or capture an index over pp", rule.pos)
    return _Placement(tuple(placement), tuple(policies), tuple(stages))


def _stages(rule: Rule, captures: Mapping[str, str], topology: Topology,
            default_name: str) -> list[tuple[int, str]]:
    out: dict[int, str] = {}
    for ref in rule.stage.stages:
        stage = {"first": 0, "last": topology.pp - 1}.get(ref.where, ref.where)
        if not 0 <= stage < topology.pp:
            raise Located(f"stage {stage} does not exist with pp={topology.pp}", rule.stage.pos)
        out.setdefault(stage, default_name if ref.alias is None else ref.alias.format(captures))
    return list(out.items())


def from_ast(ast: A.SpecAst, constants: Mapping[str, int] | None = None) -> Spec:
    """Resolves a parsed spec into a :class:`Spec` (``constants`` override the spec's values)."""
    try:
        resolved: Resolved = resolve(ast, constants)
    except Located as e:
        raise error_at(e.message, e.pos, ast) from e
    return Spec(ast, resolved.constants, resolved.indices, resolved.rules, resolved.default,
                dict(constants or {}))


def load_spec(spec: Spec | str | os.PathLike[str], *,
              constants: Mapping[str, int] | None = None) -> Spec:
    """Loads a UCL spec: a bundled spec's name, a file, or the spec text itself.

    One resolver for every ``spec=`` argument and ``--spec`` option of ucp. A string is, in this
    order: an existing file (read as UTF-8), the name of a bundled spec (``gpt2``,
    ``llama_megatron``, ... see :func:`bundled_spec_names`), else UCL text. A single word that is
    none of these and does not parse as UCL (a misspelled name or a missing file) is an error
    listing the bundled specs, not a syntax error. A :class:`Spec` is returned as it is
    (with ``constants`` applied).

    Args:
        spec: a bundled spec's name, a path, the spec text, or a loaded Spec.
        constants: values that replace the spec's own for these constants (every constant that
            depends on them is recomputed), e.g. ``{"heads": 16, "kv_heads": 4}``.

    Returns:
        The resolved spec.

    Raises:
        UcpSpecError: on a syntax or semantic error (:class:`UclError`, with line, column and
            a caret context), an unknown constant in ``constants``, an unreadable file, or a
            word that names neither a bundled spec nor a file.

    Example:
        >>> spec = load_spec('hidden = 8  param "w" split tp dim 0 parts [hidden, hidden]')
        >>> spec.layout("w", (16, 4), Topology(tp=2)).local_shape(1)
        (8, 4)
        >>> load_spec("llama_megatron").source
        'llama_megatron.ucl'
    """
    if isinstance(spec, Spec):
        return spec.with_constants(constants) if constants else spec
    text, source = _read(spec)
    return from_ast(parse(text, source=source), constants)


def bundled_spec(name: str, *, constants: Mapping[str, int] | None = None) -> Spec:
    """Loads bundled spec ``name``, with ``constants`` overriding its defaults.

    Raises:
        UclError: when there is no such bundled spec (the message lists those there are).

    Example:
        >>> spec = bundled_spec("llama_megatron", constants={"num_layers": 16})
        >>> spec.constants["head_dim"]
        128
    """
    return from_ast(parse(bundled_spec_text(name), source=f"{name}.ucl"), constants)


# A string with none of UCL's punctuation or spaces: what a name or a path looks like.
_WORD = re.compile(r"[^\s\"'{}\[\]=#,()]+")


def _read(spec: str | os.PathLike[str]) -> tuple[str, str]:
    """The spec's text and the source name its errors show."""
    if isinstance(spec, os.PathLike):
        return _read_file(Path(spec))
    if not isinstance(spec, str):
        raise UclError(f"load_spec() takes a bundled spec's name, a path or the spec text, got "
                       f"{type(spec).__name__}")
    if "\n" not in spec and _is_file(spec):
        return _read_file(Path(spec))
    word = spec.strip()
    if word in bundled_spec_names():
        return bundled_spec_text(word), f"{word}.ucl"
    if _WORD.fullmatch(word):
        try:  # a lone keyword such as "default" is a whole spec
            parse(spec)
        except UclError as e:
            raise UclError(f"no bundled spec or file named {word!r}; bundled: "
                           f"{', '.join(bundled_spec_names())}", source=word) from e
    return spec, "<string>"


def _read_file(path: Path) -> tuple[str, str]:
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as e:
        raise UclError(f"cannot read spec file: {e}", source=str(path)) from e


def _is_file(text: str) -> bool:
    try:
        return len(text) < 4096 and Path(text).is_file()
    except (OSError, ValueError):
        return False
