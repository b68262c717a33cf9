"""From syntax tree to resolved rules: constants evaluated, patterns compiled, clauses checked.

Everything that does not depend on a parameter's shape or on a topology is checked here, once, so
that a spec that loads has no internal contradiction left (an axis used twice, a capture the
engine name lacks, a division that is not exact, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from . import _ast as A
from ._pattern import Pattern, PatternError, compile_pattern

__all__ = ["Located", "SplitOp", "StageRef", "StagePlacement", "Index", "Rule", "Resolved",
           "resolve", "AXES", "POLICIES"]

AXES = ("tp", "ep", "dp", "sp", "pp")
POLICIES = ("check", "average", "first")
LANGUAGE_VERSION = 1
#: Largest magnitude a constant may take; keeps hostile specs from building huge integers.
MAX_VALUE = 1 << 62
_RESERVED = frozenset(AXES) | {"first", "last"}


class Located(Exception):
    """An internal error with a position; the public API turns it into :class:`UclError`."""

    def __init__(self, message: str, pos: A.Pos | None) -> None:
        super().__init__(message)
        self.message, self.pos = message, pos


@dataclasses.dataclass(frozen=True)
class SplitOp:
    """``split``, resolved. Exactly one of the layouts applies along ``dim``:

    plain (contiguous shards), ``parts`` (each part sharded on its own; ``equal_parts`` when the
    count is given instead of sizes), ``groups`` x ``group_sizes`` (whole groups per shard,
    part-major in the canonical tensor) or padding (``pad_size`` is the unpadded length, padded to
    ``pad_to`` or to a multiple of the shard count times ``pad_multiple``).
    """

    axes: tuple[str, ...]
    dim: int
    pos: A.Pos
    parts: tuple[int, ...] | None = None
    equal_parts: int | None = None
    groups: int | None = None
    group_sizes: tuple[int, ...] | None = None
    pad_size: int | None = None
    pad_multiple: int | None = None
    pad_to: int | None = None
    balanced: bool = False
    unit: int = 1


@dataclasses.dataclass(frozen=True)
class StageRef:
    """One stage of a ``stage`` clause: ``"first"``, ``"last"`` or a number, and its own name."""

    where: str | int
    alias: Pattern | None


@dataclasses.dataclass(frozen=True)
class StagePlacement:
    """A ``stage`` clause: the stages holding the parameter and how copies consolidate."""

    stages: tuple[StageRef, ...]
    policy: str
    pos: A.Pos


@dataclasses.dataclass(frozen=True)
class Index:
    """``index {capture} over axis``: how many index values each coordinate of the axis holds."""

    capture: str
    axis: str
    count: int
    first: int | None
    last: int | None
    counts: tuple[int, ...] | None
    pos: A.Pos

    def starts(self, size: int) -> tuple[int, ...]:
        """The first index value held at each coordinate, plus ``count`` at the end.

        Raises:
            Located: when the values cannot be spread over ``size`` coordinates as declared.
        """
        if self.counts is not None:
            if len(self.counts) != size:
                raise Located(f"index {{{self.capture}}} lists {len(self.counts)} counts, but "
                              f"{self.axis}={size}; give one count per {self.axis} coordinate",
                              self.pos)
            per = list(self.counts)
        else:
            per = self._even(size)
        out = [0]
        for n in per:
            out.append(out[-1] + n)
        return tuple(out)

    def _even(self, size: int) -> list[int]:
        first, last, what = self.first, self.last, f"index {{{self.capture}}}"
        if size == 1:
            return [self.count]
        if size == 2 and (first is not None or last is not None):
            first = self.count - last if first is None else first
            last = self.count - first if last is None else last
            if first < 0 or last < 0 or first + last != self.count:
                raise Located(f"{what}: first {first} + last {last} != {self.count} with "
                              f"{self.axis}=2", self.pos)
            return [first, last]
        inner, middle = self.count - (first or 0) - (last or 0), size - (first is not None) - (
            last is not None)
        if inner < 0 or inner % middle:
            raise Located(f"{what}: {inner} values do not spread evenly over {middle} "
                          f"{self.axis} coordinates (count {self.count}, {self.axis}={size}); "
                          f"change `first`/`last` or list the counts: `= [a, b, ...]`", self.pos)
        per = [inner // middle] * size
        if first is not None:
            per[0] = first
        if last is not None:
            per[-1] = last
        return per


@dataclasses.dataclass(frozen=True)
class Rule:
    """A resolved ``param`` rule (``pattern`` None for the ``default`` rule).

    ``replicate`` maps axes to their consolidation policy; ``perm`` is the transpose (local dim i
    is canonical dim ``perm[i]``), ``reverse`` a ``transpose`` without a list, which reverses the
    dims of whatever rank the parameter has; ``indices`` are the pattern's index captures.
    """

    pattern: Pattern | None
    engine: Pattern | None
    optional: bool
    splits: tuple[SplitOp, ...]
    replicate: tuple[tuple[str, str], ...]
    stage: StagePlacement | None
    perm: tuple[int, ...] | None
    reverse: bool
    indices: tuple[Index, ...]
    pos: A.Pos

    def describe(self) -> str:
        """``param "pattern" (line N)`` or ``default rule (line N)``, for messages."""
        what = "default rule" if self.pattern is None else f'param "{self.pattern.text}"'
        return f"{what} (line {self.pos.line})"


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A spec after resolution: constants, index declarations and rules in file order."""

    constants: Mapping[str, int]
    indices: Mapping[str, Index]
    rules: tuple[Rule, ...]
    default: Rule | None


def evaluate(expr: A.Expr, env: Mapping[str, int]) -> int:
    """The integer value of ``expr``; ``/`` must divide exactly (use ``//`` to round down)."""
    if isinstance(expr, A.Num):
        value = expr.value
    elif isinstance(expr, A.Name):
        if expr.name not in env:
            raise Located(f"unknown constant {expr.name!r}; define it above its first use, e.g. "
                          f"`{expr.name} = 8`", expr.pos)
        value = env[expr.name]
    elif isinstance(expr, A.Neg):
        value = -evaluate(expr.operand, env)
    else:
        value = _binop(expr, evaluate(expr.left, env), evaluate(expr.right, env))
    if abs(value) > MAX_VALUE:
        raise Located(f"value {value} is out of range (at most 2**62 in magnitude)", expr.pos)
    return value


def _binop(expr: A.BinOp, a: int, b: int) -> int:
    if expr.op in ("/", "//", "%") and b == 0:
        raise Located(f"division by zero in `{expr.op}`", expr.pos)
    if expr.op == "/":
        if a % b:
            raise Located(f"{a} / {b} is not a whole number; `/` must divide exactly (write `//` "
                          "to round down)", expr.pos)
        return a // b
    if expr.op == "//":
        return a // b
    if expr.op == "%":
        return a % b
    return a + b if expr.op == "+" else a - b if expr.op == "-" else a * b


def resolve(ast: A.SpecAst, overrides: Mapping[str, int] | None = None) -> Resolved:
    """Resolves a parsed spec, with ``overrides`` replacing the values of named constants.

    Raises:
        Located: on any error; ``pos`` is None for an unknown override.
    """
    overrides = dict(overrides or {})
    env: dict[str, int] = {}
    indices: dict[str, Index] = {}
    decls: list[A.RuleDecl] = []
    for i, st in enumerate(ast.statements):
        if isinstance(st, A.Version):
            if i != 0 or st.number != LANGUAGE_VERSION:
                raise Located(f"`ucl {st.number}`: this ucp reads UCL version {LANGUAGE_VERSION}, "
                              "declared as the first statement", st.pos)
        elif isinstance(st, A.Const):
            _define(st, env, overrides)
        elif isinstance(st, A.IndexDecl):
            _declare_index(st, env, indices)
        else:
            decls.append(st)
    unknown = sorted(set(overrides) - set(env))
    if unknown:
        raise Located(f"cannot override {', '.join(unknown)}: not a constant of this spec "
                      f"(it defines: {', '.join(env) or 'none'})", None)
    rules, default = [], None
    for decl in decls:
        rule = _rule(decl, env, indices)
        if decl.pattern is not None:
            rules.append(rule)
        elif default is not None:
            raise Located(f"a second `default` rule; the first is at line {default.pos.line}",
                          decl.pos)
        else:
            default = rule
    return Resolved(dict(env), dict(indices), tuple(rules), default)


def _define(st: A.Const, env: dict[str, int], overrides: Mapping[str, int]) -> None:
    if st.name in env:
        raise Located(f"constant {st.name!r} is defined twice; rename one of them", st.pos)
    if st.name in _RESERVED:
        raise Located(f"{st.name!r} is a reserved word of UCL; pick another constant name", st.pos)
    if st.name in overrides:
        value = overrides[st.name]
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) > MAX_VALUE:
            raise Located(f"override {st.name}={value!r} must be an integer", None)
        env[st.name] = value
    else:
        env[st.name] = evaluate(st.value, env)


def _declare_index(st: A.IndexDecl, env: Mapping[str, int], indices: dict[str, Index]) -> None:
    if st.capture in indices:
        raise Located(f"index {{{st.capture}}} is declared twice", st.pos)
    if any(ix.axis == st.axis for ix in indices.values()):
        raise Located(f"another index already spreads over {st.axis}; one index per axis", st.pos)
    ev = lambda e: None if e is None else _nonneg(e, env, "an index count")  # noqa: E731
    counts = None if st.counts is None else tuple(ev(c) for c in st.counts)
    count = sum(counts) if counts is not None else ev(st.count)
    indices[st.capture] = Index(st.capture, st.axis, count, ev(st.first), ev(st.last), counts,
                                st.pos)


def _nonneg(expr: A.Expr, env: Mapping[str, int], what: str, *, minimum: int = 0) -> int:
    value = evaluate(expr, env)
    if value < minimum:
        raise Located(f"{what} must be at least {minimum}, got {value}", expr.pos)
    return value


def _compile(text: A.Text) -> Pattern:
    try:
        return compile_pattern(text.value)
    except PatternError as e:
        raise Located(str(e), A.Pos(text.pos.line, text.pos.column + e.offset)) from e


def _same_captures(canonical: Pattern, other: Pattern, pos: A.Pos) -> None:
    if set(canonical.captures) != set(other.captures):
        raise Located(f'"{other.text}" must use the same captures as "{canonical.text}" '
                      f"(names and kinds), so that each name can be computed from the other", pos)


def _rule(decl: A.RuleDecl, env: Mapping[str, int], indices: Mapping[str, Index]) -> Rule:
    pattern = None if decl.pattern is None else _compile(decl.pattern)
    used: list[Index] = []
    for cap in pattern.captures if pattern else ():
        if cap.name in indices:
            if cap.kind != "int":
                raise Located(f"capture {{{cap.name}}} is an index, so it must be a number: "
                              f"write {{{cap.name}}}", decl.pattern.pos)
            used.append(indices[cap.name])
    one: dict[type, A.Clause] = {}
    splits, replicate, axes_seen = [], [], {ix.axis: ix.pos for ix in used}
    for clause in decl.clauses:
        if isinstance(clause, (A.Engine, A.Stage, A.Transpose)):
            if type(clause) in one:
                raise Located(f"a second `{type(clause).__name__.lower()}` clause in this rule; "
                              f"merge it with the one at line {one[type(clause)].pos.line}",
                              clause.pos)
            one[type(clause)] = clause
            continue
        for axis in clause.axes:
            _claim(axis, clause.pos, axes_seen, used)
        if isinstance(clause, A.Split):
            splits.append(_split(clause, env, splits))
        else:
            replicate += [(axis, clause.policy or "check") for axis in clause.axes]
    engine = one.get(A.Engine)
    stage = _stage(one.get(A.Stage), pattern, env, axes_seen, used)
    if engine is not None:
        if pattern is None:
            raise Located("the default rule has no pattern, so it cannot rename; give the "
                          "parameters their own `param` rule", engine.pos)
        _same_captures(pattern, _compile(engine.pattern), engine.pattern.pos)
    perm, reverse = _transpose(one.get(A.Transpose), env)
    return Rule(pattern, None if engine is None else _compile(engine.pattern), decl.optional,
                tuple(splits), tuple(replicate), stage, perm, reverse, tuple(used), decl.pos)


def _claim(axis: str, pos: A.Pos, seen: dict[str, A.Pos], used: list[Index]) -> None:
    if axis in seen:
        owner = next((f"index {{{ix.capture}}}" for ix in used if ix.axis == axis), None)
        why = (f"it is already spread by {owner}" if owner
               else f"it is already used at line {seen[axis].line}")
        raise Located(f"axis {axis} appears twice in this rule ({why}); an axis either splits, "
                      "replicates or indexes a parameter", pos)
    seen[axis] = pos


def _stage(clause: A.Stage | None, pattern: Pattern | None, env: Mapping[str, int],
           seen: Mapping[str, A.Pos], used: list[Index]) -> StagePlacement | None:
    if clause is None:
        return None
    if "pp" in seen:
        raise Located("`stage` places a parameter on pipeline stages, but pp is already used by "
                      "this rule (an index or `replicate pp`); drop one of them", clause.pos)
    refs = []
    for item in clause.items:
        where = item.where if isinstance(item.where, str) else _nonneg(item.where, env, "a stage")
        alias = None
        if item.alias is not None:
            if pattern is None:
                raise Located("the default rule cannot name a stage copy; write a `param` rule",
                              item.alias.pos)
            alias = _compile(item.alias)
            _same_captures(pattern, alias, item.alias.pos)
        refs.append(StageRef(where, alias))
    return StagePlacement(tuple(refs), clause.policy or "check", clause.pos)


def _transpose(clause: A.Transpose | None, env: Mapping[str, int]) -> tuple[tuple[int, ...] | None, bool]:
    if clause is None:
        return None, False
    if clause.perm is None:
        return None, True
    perm = tuple(evaluate(e, env) for e in clause.perm)
    if sorted(perm) != list(range(len(perm))):
        raise Located(f"transpose {list(perm)} is not a permutation of 0..{len(perm) - 1}",
                      clause.pos)
    return perm, False


def _split(clause: A.Split, env: Mapping[str, int], earlier: list[SplitOp]) -> SplitOp:
    if "pp" in clause.axes:
        raise Located("a parameter cannot be split over pp; pipeline stages hold whole "
                      "parameters: use `index {layer} over pp` or `stage`", clause.pos)
    dim = _nonneg(clause.dim, env, "a dim")
    if any(s.dim == dim for s in earlier):
        raise Located(f"dim {dim} is split twice; list every axis in one clause, outer first: "
                      "`split ep, tp dim ...`", clause.pos)
    fields: dict[str, object] = {}
    layout = None
    for opt in clause.options:
        if isinstance(opt, A.Balanced):
            if "balanced" in fields:
                raise Located("`balanced` is given twice", opt.pos)
            fields["balanced"] = True
            fields["unit"] = 1 if opt.unit is None else _nonneg(opt.unit, env, "a unit", minimum=1)
            continue
        if layout is not None:
            raise Located(f"`{_keyword(opt)}` cannot be combined with `{_keyword(layout)}` in one "
                          "split", opt.pos)
        layout = opt
        fields.update(_layout_fields(opt, env))
    if isinstance(layout, A.Pad) and fields.get("balanced"):
        raise Located("a padded split cannot also be `balanced`", clause.pos)
    if isinstance(layout, A.Groups) and fields.get("unit", 1) != 1:
        raise Located("`balanced` groups move whole groups; drop `by ...`", clause.pos)
    return SplitOp(tuple(clause.axes), dim, clause.pos, **fields)


def _keyword(opt: A.SplitOption) -> str:
    return {A.Parts: "parts", A.Groups: "groups", A.Pad: "pad", A.Balanced: "balanced"}[type(opt)]


def _layout_fields(opt: A.SplitOption, env: Mapping[str, int]) -> dict[str, object]:
    size = lambda e: _nonneg(e, env, "a size", minimum=1)  # noqa: E731
    if isinstance(opt, A.Parts):
        if opt.count is not None:
            return {"equal_parts": size(opt.count)}
        return {"parts": tuple(size(e) for e in opt.sizes)}
    if isinstance(opt, A.Groups):
        return {"groups": size(opt.count), "group_sizes": tuple(size(e) for e in opt.sizes)}
    fields = {"pad_size": size(opt.size)}
    if opt.multiple is not None:
        fields["pad_multiple"] = size(opt.multiple)
    else:
        fields["pad_to"] = size(opt.to)
        if fields["pad_to"] < fields["pad_size"]:
            raise Located(f"cannot pad {fields['pad_size']} down to {fields['pad_to']}", opt.pos)
    return fields
