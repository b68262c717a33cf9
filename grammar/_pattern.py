"""Name patterns with named captures: ``decoder.layers.{layer}.mlp.{proj:*}.weight``.

A pattern matches a whole parameter name. Everything outside braces is literal text. A capture is

- ``{name}``: a decimal number without leading zeros (``0``, ``7``, ``31``), e.g. a layer index;
- ``{name:*}``: one or more characters other than ``.`` (one component of a dotted name);
- ``{name:**}``: one or more characters of any kind, dots included.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Mapping

__all__ = ["Capture", "Pattern", "PatternError", "compile_pattern"]

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(\*\*?))?\}")
_KIND_BY_SUFFIX = {None: "int", "*": "segment", "**": "any"}
_POSSESSIVE = {"int": r"(?:0|[1-9][0-9]*+)", "segment": r"[^.]++"}
#: What one character of a capture may be ("any" excludes a newline, as the regex ``.`` did).
_CLASSES: dict[str, Callable[[str], bool]] = {
    "digit": lambda c: "0" <= c <= "9", "nonzero": lambda c: "1" <= c <= "9",
    "segment": lambda c: c != ".", "any": lambda c: c != "\n"}


class PatternError(ValueError):
    """A malformed pattern; ``offset`` is the character offset of the problem in the pattern."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclasses.dataclass(frozen=True)
class Capture:
    """A named capture: ``kind`` is ``"int"``, ``"segment"`` or ``"any"``."""

    name: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A compiled name pattern; ``parts`` alternate literal text and :class:`Capture` s."""

    text: str
    parts: tuple[str | Capture, ...]

    @property
    def captures(self) -> tuple[Capture, ...]:
        return tuple(p for p in self.parts if isinstance(p, Capture))

    @functools.cached_property
    def _possessive(self) -> re.Pattern[str] | None:
        """A regex that cannot backtrack, for patterns where no capture can end in two places
        (each ``{n}`` or ``{n:*}`` is followed by a character it cannot take, no ``{n:**}``):
        the usual case, and several times faster than the NFA. None for other patterns."""
        body = []
        for i, p in enumerate(self.parts):
            if isinstance(p, str):
                body.append(re.escape(p))
                continue
            after = self.parts[i + 1] if i + 1 < len(self.parts) else ""
            if p.kind == "any" or not isinstance(after, str) or (after and _CLASSES[
                    "digit" if p.kind == "int" else "segment"](after[0])):
                return None
            body.append(f"(?P<{p.name}>{_POSSESSIVE[p.kind]})")
        return re.compile("".join(body))

    @functools.cached_property
    def _program(self) -> tuple[tuple[Any, ...], ...]:
        return _compile(self.parts)

    def match(self, name: str) -> dict[str, str] | None:
        """The captured values when ``name`` matches the whole pattern, else None.

        Runs in time linear in ``len(name)`` for any pattern (a Thompson NFA, as RE2 does;
        a backtracking regex takes exponential time on ``{a:**}{b:**}...x``, so a spec stored in
        a hostile checkpoint could hang every command that reads it). Where several ways to
        match exist, captures are those Python's ``re`` gives (leftmost alternative, greedy).
        """
        first, last = self.parts[0], self.parts[-1]
        if isinstance(first, str) and not name.startswith(first) or \
                isinstance(last, str) and not name.endswith(last):
            return None  # the common case for a rule that does not apply: no NFA run
        if self._possessive is not None:
            m = self._possessive.fullmatch(name)
            return None if m is None else m.groupdict()
        slots = _simulate(self._program, name, 2 * len(self.captures))
        if slots is None:
            return None
        return {c.name: name[slots[2 * i]:slots[2 * i + 1]] for i, c in enumerate(self.captures)}

    def format(self, values: Mapping[str, str | int]) -> str:
        """The name with every capture replaced by ``values[capture]``."""
        return "".join(p if isinstance(p, str) else str(values[p.name]) for p in self.parts)

    def __str__(self) -> str:
        return self.text


def compile_pattern(text: str) -> Pattern:
    """Compiles a pattern.

    Raises:
        PatternError: on an empty pattern, a stray brace or a capture named twice.
    """
    if not text:
        raise PatternError("empty pattern; write the parameter name, e.g. \"layers.{layer}.weight\"", 0)
    parts: list[str | Capture] = []
    seen: set[str] = set()
    pos = 0
    for m in _CAPTURE.finditer(text):
        _literal(text, pos, m.start(), parts)
        name, kind = m.group(1), _KIND_BY_SUFFIX[m.group(2)]
        if name in seen:
            raise PatternError(f"capture {{{name}}} appears twice in the pattern; give each "
                               "capture its own name", m.start())
        seen.add(name)
        parts.append(Capture(name, kind))
        pos = m.end()
    _literal(text, pos, len(text), parts)
    return Pattern(text, tuple(parts))


def _literal(text: str, start: int, stop: int, parts: list[str | Capture]) -> None:
    chunk = text[start:stop]
    for i, ch in enumerate(chunk):
        if ch in "{}":
            raise PatternError(f"stray {ch!r} in pattern; a capture is {{name}} (a number), "
                               "{name:*} (text without dots) or {name:**} (any text)", start + i)
    if chunk:
        parts.append(chunk)


# -- matching in linear time: a Pike VM over a tiny program -----------------------------------------
# Instructions: ("char", c), ("class", kind), ("split", preferred, other), ("jmp", to),
# ("save", slot), ("match",). Threads are kept in priority order and at most one per
# instruction, so a match costs O(len(name) * len(program)).

def _compile(parts: tuple[str | Capture, ...]) -> tuple[tuple[Any, ...], ...]:
    prog: list[tuple[Any, ...]] = []
    slot = 0
    for part in parts:
        if isinstance(part, str):
            prog += [("char", c) for c in part]
            continue
        prog.append(("save", slot))
        if part.kind == "int":  # 0|[1-9][0-9]*
            at = len(prog)
            prog += [("split", at + 1, at + 3), ("char", "0"), ("jmp", at + 7), ("class", "nonzero"),
                     ("split", at + 5, at + 7), ("class", "digit"), ("jmp", at + 4)]
        else:  # one or more, greedy
            at = len(prog)
            prog += [("class", part.kind), ("split", at + 2, at + 4), ("class", part.kind), ("jmp", at + 1)]
        prog.append(("save", slot + 1))
        slot += 2
    prog.append(("match",))
    return tuple(prog)


def _follow(prog: tuple[tuple[Any, ...], ...], pc: int, slots: tuple[int, ...], pos: int,
            out: list[tuple[int, tuple[int, ...]]], seen: set[int]) -> None:
    """Adds the thread at ``pc`` to ``out``, following jumps, splits (preferred branch first)
    and saves; an instruction already reached at this position keeps its earlier thread."""
    stack = [(pc, slots)]
    while stack:
        pc, slots = stack.pop()
        if pc in seen:
            continue
        seen.add(pc)
        op = prog[pc]
        if op[0] == "jmp":
            stack.append((op[1], slots))
        elif op[0] == "split":
            stack += [(op[2], slots), (op[1], slots)]  # popped preferred first
        elif op[0] == "save":
            stack.append((pc + 1, slots[:op[1]] + (pos,) + slots[op[1] + 1:]))
        else:
            out.append((pc, slots))


def _simulate(prog: tuple[tuple[Any, ...], ...], text: str, nslots: int) -> tuple[int, ...] | None:
    """The capture slots of the highest-priority match of all of ``text``, or None."""
    threads: list[tuple[int, tuple[int, ...]]] = []
    _follow(prog, 0, (0,) * nslots, 0, threads, set())
    for pos, ch in enumerate(text):
        nxt: list[tuple[int, tuple[int, ...]]] = []
        seen: set[int] = set()
        for pc, slots in threads:
            op = prog[pc]
            if op[0] == "char" and op[1] == ch or op[0] == "class" and _CLASSES[op[1]](ch):
                _follow(prog, pc + 1, slots, pos + 1, nxt, seen)
        if not nxt:
            return None
        threads = nxt
    return next((slots for pc, slots in threads if prog[pc][0] == "match"), None)
