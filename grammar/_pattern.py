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
from typing import Mapping

__all__ = ["Capture", "Pattern", "PatternError", "compile_pattern"]

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(\*\*?))?\}")
_KIND_BY_SUFFIX = {None: "int", "*": "segment", "**": "any"}
_REGEX_BY_KIND = {"int": r"0|[1-9][0-9]*", "segment": r"[^.]+", "any": r".+"}


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
    def _regex(self) -> re.Pattern[str]:
        body = "".join(re.escape(p) if isinstance(p, str)
                       else f"(?P<{p.name}>{_REGEX_BY_KIND[p.kind]})" for p in self.parts)
        return re.compile(body)

    def match(self, name: str) -> dict[str, str] | None:
        """The captured values when ``name`` matches the whole pattern, else None."""
        m = self._regex.fullmatch(name)
        return None if m is None else m.groupdict()

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
