"""Parsing UCL text into the syntax tree of :mod:`._ast` (Lark LALR + a Transformer).

Every failure, whatever the input, surfaces as :class:`UclError` with line, column and a caret
context: lark's own exceptions are translated here, and nothing else escapes (the fuzz test in
tests/grammar holds this module to that).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import lark
from lark import Token, Transformer, v_args

from . import _ast as A
from ._error import UclError, caret_context

__all__ = ["parse"]

#: Longest spec text accepted; a spec is a few kilobytes, anything much larger is not a spec.
MAX_SPEC_CHARS = 1 << 20
_NICE_TERMINALS = {"NAME": "a name", "INT": "an integer", "STRING": 'a quoted pattern "..."',
                   "$END": "the end of the spec", "OPTIONAL": "'optional'"}


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files(__package__).joinpath("ucl.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True,
                     maybe_placeholders=False)


def _pos(meta: Any) -> A.Pos:
    return A.Pos(getattr(meta, "line", 1), getattr(meta, "column", 1))


def _tok_pos(token: Token) -> A.Pos:
    return A.Pos(token.line or 1, token.column or 1)


def _text(token: Token) -> A.Text:
    """A STRING token without its quotes; its position is that of the first character inside."""
    return A.Text(str(token)[1:-1], A.Pos(token.line or 1, (token.column or 0) + 1))


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds :mod:`._ast` nodes bottom-up; each method handles one grammar rule or alias."""

    def start(self, meta, children):
        return tuple(children)

    def version(self, meta, children):
        return A.Version(int(children[0]), _pos(meta))

    def const(self, meta, children):
        return A.Const(str(children[0]), children[1], _pos(meta))

    def index(self, meta, children):
        name, axis, counts = children
        return A.IndexDecl(str(name), axis, *counts, pos=_pos(meta))

    def counts_even(self, meta, children):
        first = next((c[1] for c in children[1:] if c[0] == "first"), None)
        last = next((c[1] for c in children[1:] if c[0] == "last"), None)
        return (children[0], first, last, None)

    def counts_list(self, meta, children):
        return (None, None, None, tuple(children))

    def count_first(self, meta, children):
        return ("first", children[0])

    def count_last(self, meta, children):
        return ("last", children[0])

    def rule(self, meta, children):
        optional = isinstance(children[0], Token) and children[0].type == "OPTIONAL"
        rest = children[1:] if optional else children
        return A.RuleDecl(_text(rest[0]), optional, tuple(rest[1:]), _pos(meta))

    def default_rule(self, meta, children):
        return A.RuleDecl(None, False, tuple(children), _pos(meta))

    def engine(self, meta, children):
        return A.Engine(_text(children[0]), _pos(meta))

    def split(self, meta, children):
        axes = tuple(c for c in children if isinstance(c, str))
        rest = [c for c in children if not isinstance(c, str)]
        return A.Split(axes, rest[0], tuple(rest[1:]), _pos(meta))

    def parts_list(self, meta, children):
        return A.Parts(tuple(children), None, _pos(meta))

    def parts_equal(self, meta, children):
        return A.Parts(None, children[0], _pos(meta))

    def groups(self, meta, children):
        return A.Groups(children[0], tuple(children[1:]), _pos(meta))

    def pad_multiple(self, meta, children):
        return A.Pad(children[0], children[1], None, _pos(meta))

    def pad_size(self, meta, children):
        return A.Pad(children[0], None, children[1], _pos(meta))

    def balanced(self, meta, children):
        return A.Balanced(children[0] if children else None, _pos(meta))

    def replicate(self, meta, children):
        policy = children[-1] if isinstance(children[-1], tuple) else None
        axes = tuple(c for c in children if isinstance(c, str))
        return A.Replicate(axes, policy and policy[1], _pos(meta))

    def stage(self, meta, children):
        policy = children[-1] if isinstance(children[-1], tuple) else None
        items = tuple(c for c in children if isinstance(c, A.StageItem))
        return A.Stage(items, policy and policy[1], _pos(meta))

    def stage_item(self, meta, children):
        alias = _text(children[1]) if len(children) > 1 else None
        return A.StageItem(children[0], alias, _pos(meta))

    def stage_first(self, meta, children):
        return "first"

    def stage_last(self, meta, children):
        return "last"

    def stage_number(self, meta, children):
        return children[0]

    def transpose(self, meta, children):
        return A.Transpose(tuple(children) if children else None, _pos(meta))

    def policy(self, meta, children):
        return ("policy", str(children[0]))

    def axis(self, meta, children):
        return str(children[0])

    def number(self, meta, children):
        try:
            return A.Num(int(children[0]), _tok_pos(children[0]))
        except ValueError as e:  # more digits than Python converts (sys.int_info)
            raise _LocatedError("integer literal is too long", _tok_pos(children[0])) from e

    def name(self, meta, children):
        return A.Name(str(children[0]), _tok_pos(children[0]))

    def neg(self, meta, children):
        return A.Neg(children[0], _pos(meta))

    def _binop(op):  # noqa: N805 -- a factory used in the class body below
        def method(self, meta, children):
            return A.BinOp(op, children[0], children[1], _pos(meta))
        return method

    add, sub, mul, div = _binop("+"), _binop("-"), _binop("*"), _binop("/")
    floordiv, mod = _binop("//"), _binop("%")
    del _binop


class _LocatedError(Exception):
    """Raised inside the Transformer; :func:`parse` turns it into :class:`UclError`."""

    def __init__(self, message: str, pos: A.Pos) -> None:
        super().__init__(message)
        self.message, self.pos = message, pos


def _expected(names: Any) -> str:
    parser = _parser()
    shown = set()
    for name in names or ():
        if name in _NICE_TERMINALS:
            shown.add(_NICE_TERMINALS[name])
            continue
        try:
            pattern = parser.get_terminal(name).pattern
        except KeyError:
            shown.add(name)
            continue
        shown.add(f"'{pattern.value}'" if pattern.type == "str" else name)
    return ", ".join(sorted(shown))


def _from_lark(e: lark.exceptions.UnexpectedInput, text: str, source: str) -> UclError:
    if isinstance(e, lark.exceptions.UnexpectedCharacters):
        bad = text[e.pos_in_stream] if 0 <= e.pos_in_stream < len(text) else "?"
        message = f"unexpected character {bad!r}"
        allowed = _expected(e.allowed)
    else:
        token = getattr(e, "token", None)
        if token is None or token.type == "$END" or isinstance(e, lark.exceptions.UnexpectedEOF):
            message = "unexpected end of the spec"
        else:
            message = f"unexpected {str(token)!r}"
        allowed = _expected(getattr(e, "expected", None) or getattr(e, "accepts", None))
    if allowed:
        message += f"; expected {allowed}"
    if message.startswith("unexpected end"):  # point just after the last thing written
        end = len(text.rstrip())
        line = text.count("\n", 0, end) + 1
        column = end - (text.rfind("\n", 0, end) + 1) + 1
        return UclError(message, source=source, line=line, column=column,
                        context=caret_context(text, line, column))
    # the same caret display as semantic errors (lark's get_context clips at 40 characters)
    return UclError(message, source=source, line=e.line, column=e.column,
                    context=caret_context(text, e.line, e.column))


def parse(text: str, *, source: str = "<string>") -> A.SpecAst:
    """Parses UCL ``text`` into a :class:`~._ast.SpecAst`; nothing is evaluated yet.

    Args:
        text: the spec.
        source: the file name shown in errors.

    Returns:
        The statements in file order.

    Raises:
        UclError: on any syntax error, with line, column and a caret context.
    """
    if not isinstance(text, str):
        raise UclError(f"a spec is text, got {type(text).__name__}", source=source)
    if len(text) > MAX_SPEC_CHARS:
        raise UclError(f"spec is {len(text)} characters, more than the {MAX_SPEC_CHARS} a spec may "
                       "have; is this file a spec?", source=source)
    try:
        tree = _parser().parse(text)
        statements = _ToAst().transform(tree)
    except lark.exceptions.UnexpectedInput as e:
        raise _from_lark(e, text, source) from e
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, _LocatedError):
            pos = e.orig_exc.pos
            raise UclError(e.orig_exc.message, source=source, line=pos.line, column=pos.column,
                           context=caret_context(text, pos.line, pos.column)) from e
        raise
    except RecursionError as e:
        raise UclError("expression is nested too deeply", source=source) from e
    return A.SpecAst(statements, text, source)
