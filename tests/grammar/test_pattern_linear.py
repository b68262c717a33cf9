"""Name patterns match in linear time, with the captures a backtracking regex gives."""

from __future__ import annotations

import re
import subprocess
import sys

from hypothesis import given, settings, strategies as st

from ucp.grammar._pattern import compile_pattern

_REGEX = {"int": r"0|[1-9][0-9]*", "segment": r"[^.]+", "any": r".+"}


def _reference(pattern, name):
    body = "".join(re.escape(p) if isinstance(p, str) else f"(?P<{p.name}>{_REGEX[p.kind]})"
                   for p in pattern.parts)
    m = re.fullmatch(body, name)
    return None if m is None else m.groupdict()


def test_hostile_pattern_does_not_backtrack():
    # exponential for a backtracking matcher (days); a linear one answers at once
    code = ("from ucp.grammar._pattern import compile_pattern\n"
            "p = compile_pattern('{a:**}{b:**}{c:**}{d:**}{e:**}{f:**}{g:**}{h:**}{i:**}{j:**}x{k:*}')\n"
            "assert p.match('a' * 3000) is None\n"
            "assert p.match('a' * 3000 + 'xb') is not None\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_alpha = st.sampled_from("ab.01x")
_literal = st.text(_alpha, max_size=2)
_kind = st.sampled_from(["", ":*", ":**"])


@settings(max_examples=400, deadline=None)
@given(literals=st.lists(_literal, min_size=1, max_size=5), kinds=st.lists(_kind, max_size=4),
       name=st.text(_alpha, max_size=12))
def test_same_captures_as_the_regex(literals, kinds, name):
    text = literals[0] + "".join(f"{{c{i}{k}}}{lit}" for i, (k, lit) in enumerate(zip(kinds, literals[1:])))
    if not text:
        return
    pattern = compile_pattern(text)
    assert pattern.match(name) == _reference(pattern, name)
    if (m := _reference(pattern, name)) is not None:
        assert pattern.format(m) == name
