"""Parsing UCL: the syntax tree, located errors with a caret, and a fuzz test of the parser."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucp import UcpError, UcpSpecError
from ucp.grammar import UclError, load_spec, parse
from ucp.grammar import _ast as A

SAMPLE = """\
ucl 1
# a comment
hidden = 64   # trailing comment
heads = 8
head_dim = hidden / heads
index {layer} over pp = 12 first 2 last 2
optional param "layers.{layer}.qkv" split tp, ep dim 0 groups 2 [6 * head_dim, head_dim, head_dim] balanced
param "emb" split tp dim 0 pad 50257 to multiple of 128 stage first, last as "out" check
param "w.{n:*}" engine "engine.w.{n:*}" transpose [1, 0] replicate dp, sp average
default replicate tp first
"""


def test_sample_parses_into_dataclasses():
    ast = parse(SAMPLE, source="sample.ucl")
    kinds = [type(s).__name__ for s in ast.statements]
    assert kinds == ["Version", "Const", "Const", "Const", "IndexDecl", "RuleDecl", "RuleDecl",
                     "RuleDecl", "RuleDecl"]
    index = ast.statements[4]
    assert (index.capture, index.axis, index.first.value, index.last.value) == ("layer", "pp", 2, 2)
    qkv = ast.statements[5]
    assert qkv.optional and qkv.pattern.value == "layers.{layer}.qkv"
    split = qkv.clauses[0]
    assert split.axes == ("tp", "ep")
    assert [type(o).__name__ for o in split.options] == ["Groups", "Balanced"]
    emb = ast.statements[6]
    stage = emb.clauses[1]
    assert [i.where for i in stage.items] == ["first", "last"]
    assert stage.items[1].alias.value == "out" and stage.policy == "check"
    w = ast.statements[7]
    assert [type(c).__name__ for c in w.clauses] == ["Engine", "Transpose", "Replicate"]
    assert w.clauses[2].policy == "average"
    assert ast.statements[8].pattern is None
    with pytest.raises(AttributeError):  # frozen
        ast.statements[1].name = "x"


def test_positions_point_at_the_source():
    ast = parse('a = 1\n  param "x.{i}"  split tp dim a')
    rule = ast.statements[1]
    assert rule.pos == A.Pos(2, 3)
    assert rule.pattern.pos == A.Pos(2, 10)  # first character inside the quotes
    assert rule.clauses[0].dim.pos == A.Pos(2, 31)


def test_newlines_do_not_matter():
    one_line = parse('a = 2 param "x" split tp dim a - 1 parts 2 param "y" replicate tp')
    many = parse('a = 2\nparam "x"\n split tp\n dim a - 1\n parts 2\nparam "y"\nreplicate tp\n')
    strip = lambda ast: [type(s).__name__ for s in ast.statements]  # noqa: E731
    assert strip(one_line) == strip(many)


@pytest.mark.parametrize("text, line, column, words", [
    ('param "x" split tp dim', 1, 23, ["end of the spec"]),
    ('a = 3\nparam "x" split tpx dim 0', 2, 19, ["unexpected"]),
    ('param "x"\n  split tp dim 0 parts [1,]]', 2, 28, ["unexpected ']'"]),
    ("a = 3 $", 1, 7, ["unexpected character '$'"]),
    ("param x", 1, 7, ["unexpected 'x'", 'quoted pattern']),
    ("heads = 32\nhead_dim = hidden / heads", 2, 12, ["unknown constant 'hidden'"]),
    ("a = 7 / 2", 1, 5, ["not a whole number", "//"]),
    ("a = 1 % 0", 1, 5, ["division by zero"]),
    ('param "x.{i" replicate tp', 1, 10, ["stray '{'"]),
    ('param "x.{i}.{i}" replicate tp', 1, 14, ["appears twice"]),
    ('param "x" split tp dim 0 split tp dim 1', 1, 26, ["axis tp appears twice"]),
    ('param "x" split pp dim 0', 1, 11, ["cannot be split over pp"]),
    ('param "x" split tp dim 0 parts 2 pad 4 to 8', 1, 34, ["cannot be combined"]),
    ('index {l} over pp = 4\nparam "a.{l:*}" replicate tp', 2, 8, ["must be a number"]),
    ('index {l} over pp = 4\nparam "a.{l}" stage first', 2, 15, ["pp is already used"]),
    ('param "a.{i}" engine "b"', 1, 23, ["same captures"]),
    ('a = 1\na = 2', 2, 1, ["defined twice"]),
    ('tp = 1', 1, 1, ["reserved"]),
    ("ucl 2", 1, 1, ["UCL version 1"]),
    ('param "x" transpose [0, 0]', 1, 11, ["not a permutation"]),
    ("default replicate tp\ndefault replicate tp", 2, 1, ["second `default`"]),
    ('param "x" split tp dim 0 pad 9 to 8', 1, 26, ["cannot pad 9 down to 8"]),
])
def test_errors_carry_line_column_and_caret(text, line, column, words):
    with pytest.raises(UclError) as info:
        load_spec(text)
    e = info.value
    assert isinstance(e, UcpSpecError) and isinstance(e, ValueError)
    assert (e.line, e.column) == (line, column), str(e)
    for word in words:
        assert word in e.message, e.message
    shown, caret = e.context.rstrip("\n").split("\n")
    assert shown == text.split("\n")[line - 1][:len(shown)]
    assert caret == " " * (column - 1) + "^"
    assert str(e).startswith(f"<string>:{line}:{column}: ")
    assert str(e).endswith(caret)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "broken.ucl"
    path.write_text('param "x"\n  split tp dim 0 parts [\n')
    with pytest.raises(UclError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}:2:25: unexpected end of the spec")


def test_overlong_integer_is_a_spec_error():
    with pytest.raises(UclError, match="too long"):
        load_spec("a = " + "9" * 5000)


def test_huge_values_are_refused():
    text = "a = 2\n" + "".join(f"a{i} = {'a' if i == 0 else f'a{i - 1}'} * {'a' if i == 0 else f'a{i - 1}'}\n"
                               for i in range(10))
    with pytest.raises(UclError, match="out of range"):
        load_spec(text)


_ALPHABET = st.sampled_from(list('param"{}[]()=,.:*+-/%# \n\t0123456789abcdeftpdimslg') + [
    "param ", "split ", "tp ", "dim ", "parts ", "groups ", "pad ", "to ", "multiple of ",
    "stage ", "first", "last", "replicate ", "average", "check", "index ", "over ", "engine ",
    "transpose ", "balanced ", "by ", "default ", "optional ", "ucl 1\n", '"x.{i}"', "{i}",
    "//", "\u00e9", "\x00"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=80), st.lists(_ALPHABET, max_size=40).map("".join)))
def test_fuzz_parser_raises_only_spec_errors(text):
    try:
        spec = load_spec(text)
    except UcpSpecError as e:
        assert str(e)
        return
    except UcpError as e:  # pragma: no cover - would be a bug: wrong error class
        pytest.fail(f"{type(e).__name__} instead of UcpSpecError: {e}")
    assert spec.text == text


_INT = st.one_of(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
                 st.integers(-2, 5), st.sampled_from(["a", "a - 3", "2 * a", "a // 0", "7 / a"]))


@st.composite
def _clauses(draw):
    i = lambda: str(draw(_INT))  # noqa: E731
    axes = ", ".join(draw(st.lists(st.sampled_from(["tp", "tp", "ep", "dp", "sp", "pp"]),
                                   min_size=1, max_size=2, unique=True)))
    option = draw(st.sampled_from([
        "", f"parts [{i()}, {i()}]", f"parts {i()}", f"groups {i()} [{i()}, {i()}]",
        f"pad {i()} to multiple of {i()}", f"pad {i()} to {i()}", f"balanced by {i()}", "balanced"]))
    return draw(st.sampled_from([
        f"split {axes} dim {i()} {option}", f"replicate {axes} average", f"replicate {axes}",
        f"stage first, last as \"w.{{x}}\" check", f"stage {i()}", f"transpose [{i()}, {i()}]",
        "transpose", 'engine "e.{x}"', 'engine "e.{x}.{y}"']))


@st.composite
def _specs(draw):
    lines = [f"a = {draw(st.integers(-3, 6))}"]
    if draw(st.booleans()):
        lines.append(f"index {{x}} over {draw(st.sampled_from(['pp', 'ep']))} = "
                     + draw(st.sampled_from(["4", "a", "[1, 3]", "4 first 1", "4 last 3", "0"])))
    for _ in range(draw(st.integers(1, 3))):
        pattern = draw(st.sampled_from(['"w.{x}"', '"w.{x:*}"', '"v"', '"w.{x}.{y:**}"']))
        lines.append(f"param {pattern} " + " ".join(draw(st.lists(_clauses(), max_size=3))))
    if draw(st.booleans()):
        lines.append("default " + " ".join(draw(st.lists(_clauses(), max_size=2))))
    return "\n".join(lines)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_specs(), st.sampled_from([(4, 6), (3,), (0, 2), (8, 2, 3)]),
       st.sampled_from([(1, 1, 1), (2, 2, 1), (3, 1, 2), (2, 4, 4)]), st.data())
def test_fuzz_semantics_raise_only_spec_errors(text, shape, sizes, data):
    """Well-formed but arbitrary specs: loading, checking, cutting and naming either work or raise
    UcpSpecError, on every shape and topology."""
    import torch
    from ucp import Topology

    topo = Topology(tp=sizes[0], pp=sizes[1], ep=sizes[2])
    try:
        spec = load_spec(text)
        names = ["w.1", "w.3.k", "v", "w.x", "other"]
        spec.check({n: shape for n in names}, topology=topo)
        name = data.draw(st.sampled_from(names))
        rank = data.draw(st.integers(0, topo.world_size - 1))
        spec.local_name(name, topo, rank)
        spec.canonical_name(name, topo, rank)
        full = torch.arange(int(torch.tensor(shape).prod())).reshape(shape)
        frags = {r: spec.cut(name, full, topo, r) for r in spec.holders(name, topo)}
        assert torch.equal(spec.consolidate(name, frags, topo), full)
    except UcpSpecError:
        pass
