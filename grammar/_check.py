"""Linting a spec against the parameters of a checkpoint (names and canonical shapes)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Sequence

from ucp.core._errors import UcpSpecError
from ucp.core._topology import Topology

from ._error import UclError

if TYPE_CHECKING:
    from ._spec import Spec

__all__ = ["Problem", "check_spec"]

KINDS = ("uncovered", "unmatched", "shape", "index")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One finding of :meth:`Spec.check`.

    Attributes:
        kind: ``uncovered`` (a parameter no rule covers), ``unmatched`` (a non-optional rule that
            matches no parameter), ``shape`` (a parameter's shape does not fit its rule) or
            ``index`` (an index count disagrees with the parameters' index values).
        message: what is wrong and how to fix it.
        line: the spec line the problem is about, when there is one.
        param: the parameter the problem is about, when there is one.
    """

    kind: str
    message: str
    line: int | None = None
    param: str | None = None

    def __str__(self) -> str:
        where = "" if self.line is None else f"line {self.line}: "
        return f"{where}{self.kind}: {self.message}"


def check_spec(spec: Spec, params: Mapping[str, Sequence[int]],
               topology: Topology | None) -> list[Problem]:
    """See :meth:`Spec.check`."""
    problems: list[Problem] = []
    used: dict[int, int] = {id(r): 0 for r in spec.rules}
    index_values: dict[str, set[int]] = {}
    for name in sorted(params):
        match = spec.match(name)
        if match is None:
            problems.append(Problem("uncovered", f"parameter {name!r} matches no rule; add a "
                                    "`param` rule for it or a `default` rule", param=name))
            continue
        used[id(match.rule)] = used.get(id(match.rule), 0) + 1
        in_range = True
        for ix in match.rule.indices:
            value = int(match.captures[ix.capture])
            index_values.setdefault(ix.capture, set()).add(value)
            in_range = in_range and value < ix.count
        if not in_range:  # reported once per index below
            continue
        problem = _shape_problem(spec, name, params[name], topology or Topology())
        if problem is not None:
            problems.append(problem)
    for rule in spec.rules:
        if not used[id(rule)] and not rule.optional:
            problems.append(Problem("unmatched", f"{rule.describe()} matches no parameter; fix "
                                    "the pattern (an earlier rule may take its parameters: the "
                                    "first match wins) or mark it `optional`", line=rule.pos.line))
    for capture, values in sorted(index_values.items()):
        ix = spec.indices[capture]
        if len(values) != ix.count or max(values) >= ix.count:
            problems.append(Problem(
                "index", f"index {{{capture}}} declares {ix.count} values (0..{ix.count - 1}), "
                f"but the parameters use {_ranges(values)}; set the count to what the model has",
                line=ix.pos.line))
    return problems


def _shape_problem(spec: Spec, name: str, shape: Sequence[int],
                   topology: Topology) -> Problem | None:
    try:
        dims = tuple(int(s) for s in shape)
        if any(d < 0 for d in dims):
            raise ValueError(dims)
    except (TypeError, ValueError):
        return Problem("shape", f"{name!r} has shape {shape!r}; a shape is a list of sizes >= 0",
                       param=name)
    try:
        spec.layout(name, dims, topology)
    except UclError as e:
        return Problem("shape", e.message, line=e.line, param=name)
    except UcpSpecError as e:
        return Problem("shape", str(e), param=name)
    return None


def _ranges(values: set[int]) -> str:
    ordered, out = sorted(values), []
    start = prev = ordered[0]
    for v in ordered[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}..{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
