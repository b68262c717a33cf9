"""The UCL syntax tree: frozen dataclasses built by the parser's Transformer.

Nothing here is evaluated: expressions stay :data:`Expr` trees and patterns stay text, so a spec can
be resolved again with other constants (see ``load_spec(..., constants=...)``). Every node carries
the :class:`Pos` it was read from, which errors report.
"""

from __future__ import annotations

import dataclasses
from typing import Union

__all__ = [
    "Pos", "Num", "Name", "BinOp", "Neg", "Expr", "Text", "Version", "Const", "IndexDecl", "Parts",
    "Groups", "Pad", "Balanced", "SplitOption", "Split", "Replicate", "StageItem", "Stage",
    "Transpose", "Engine", "Clause", "RuleDecl", "Statement", "SpecAst",
]


@dataclasses.dataclass(frozen=True)
class Pos:
    """A 1-based line and column in the spec text."""

    line: int
    column: int


@dataclasses.dataclass(frozen=True)
class Num:
    """An integer literal."""

    value: int
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Name:
    """A reference to a constant."""

    name: str
    pos: Pos


@dataclasses.dataclass(frozen=True)
class BinOp:
    """``left op right`` with ``op`` one of ``+ - * / // %``."""

    op: str
    left: Expr
    right: Expr
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Neg:
    """``-operand``."""

    operand: Expr
    pos: Pos


Expr = Union[Num, Name, BinOp, Neg]


@dataclasses.dataclass(frozen=True)
class Text:
    """A quoted string (a name pattern) without its quotes."""

    value: str
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Version:
    """``ucl N``: the language version the spec is written in."""

    number: int
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Const:
    """``name = expr``."""

    name: str
    value: Expr
    pos: Pos


@dataclasses.dataclass(frozen=True)
class IndexDecl:
    """``index {capture} over axis = count [first N] [last M]`` or ``= [c0, c1, ...]``."""

    capture: str
    axis: str
    count: Expr | None
    first: Expr | None
    last: Expr | None
    counts: tuple[Expr, ...] | None
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Parts:
    """``parts [a, b, ...]`` (``sizes``) or ``parts N`` (``count`` equal parts)."""

    sizes: tuple[Expr, ...] | None
    count: Expr | None
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Groups:
    """``groups K [a, b, ...]``: K groups, each made of parts of sizes a, b, ..."""

    count: Expr
    sizes: tuple[Expr, ...]
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Pad:
    """``pad SIZE to multiple of N`` (``multiple``) or ``pad SIZE to PADDED`` (``to``)."""

    size: Expr
    multiple: Expr | None
    to: Expr | None
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Balanced:
    """``balanced [by UNIT]``: uneven shards, the first ranks taking one unit more."""

    unit: Expr | None
    pos: Pos


SplitOption = Union[Parts, Groups, Pad, Balanced]


@dataclasses.dataclass(frozen=True)
class Split:
    """``split axis[, axis...] dim D [options]``."""

    axes: tuple[str, ...]
    dim: Expr
    options: tuple[SplitOption, ...]
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Replicate:
    """``replicate axis[, axis...] [check|average|first]``."""

    axes: tuple[str, ...]
    policy: str | None
    pos: Pos


@dataclasses.dataclass(frozen=True)
class StageItem:
    """One entry of a ``stage`` clause: ``first``, ``last`` or a number, optionally ``as "name"``."""

    where: str | Expr
    alias: Text | None
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Stage:
    """``stage item[, item...] [check|average|first]``."""

    items: tuple[StageItem, ...]
    policy: str | None
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Transpose:
    """``transpose`` (reverse the dims) or ``transpose [p0, p1, ...]``."""

    perm: tuple[Expr, ...] | None
    pos: Pos


@dataclasses.dataclass(frozen=True)
class Engine:
    """``engine "pattern"``: the name ranks use for the parameter."""

    pattern: Text
    pos: Pos


Clause = Union[Engine, Split, Replicate, Stage, Transpose]


@dataclasses.dataclass(frozen=True)
class RuleDecl:
    """``[optional] param "pattern" clauses...`` or (``pattern`` None) ``default clauses...``."""

    pattern: Text | None
    optional: bool
    clauses: tuple[Clause, ...]
    pos: Pos


Statement = Union[Version, Const, IndexDecl, RuleDecl]


@dataclasses.dataclass(frozen=True)
class SpecAst:
    """A parsed spec: its statements in file order, the text and where it came from."""

    statements: tuple[Statement, ...]
    text: str
    source: str
