"""UCL errors that point at a line and column of the spec text."""

from __future__ import annotations

from ucp.core._errors import UcpSpecError

from ._ast import Pos, SpecAst

__all__ = ["UclError", "caret_context", "error_at"]

_SPAN = 60


class UclError(UcpSpecError):
    """A spec error located in the spec text.

    ``str(error)`` is ``source:line:column: message`` followed by the offending line and a caret
    under the column. The parts are also attributes, for tools that format errors themselves.

    Attributes:
        message: what is wrong and how to fix it, without the location.
        source: the spec's file name, or ``<string>``.
        line: 1-based line, or None when the error has no position (e.g. an unknown constant
            passed to ``load_spec(..., constants=...)``).
        column: 1-based column, or None.
        context: the offending line and a caret line, or ``""``.
    """

    def __init__(self, message: str, *, source: str = "<string>", line: int | None = None,
                 column: int | None = None, context: str = "") -> None:
        self.message, self.source, self.line, self.column = message, source, line, column
        self.context = context
        where = source if line is None else f"{source}:{line}:{column}"
        text = f"{where}: {message}"
        if context:
            text += "\n" + context.rstrip("\n")
        super().__init__(text)

    def __reduce__(self):  # keep the keyword-only constructor copyable
        return (_rebuild, (self.message, self.source, self.line, self.column, self.context))


def _rebuild(message: str, source: str, line: int | None, column: int | None,
             context: str) -> UclError:
    return UclError(message, source=source, line=line, column=column, context=context)


def caret_context(text: str, line: int, column: int) -> str:
    """The ``line``-th line of ``text`` (clipped around ``column``) and a caret under ``column``."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        return ""
    row = lines[line - 1].expandtabs(1)
    col = max(0, min(column - 1, len(row)))
    start = max(0, col - _SPAN)
    shown = row[start:col + _SPAN]
    return shown + "\n" + " " * (col - start) + "^\n"


def error_at(message: str, pos: Pos | None, ast: SpecAst) -> UclError:
    """A :class:`UclError` at ``pos`` of the spec ``ast`` (no location when ``pos`` is None)."""
    if pos is None:
        return UclError(message, source=ast.source)
    return UclError(message, source=ast.source, line=pos.line, column=pos.column,
                    context=caret_context(ast.text, pos.line, pos.column))
