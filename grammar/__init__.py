"""UCL, the universal checkpoint language: parse specs, lay parameters out, cut and consolidate.

A spec says, for every parameter, how its canonical (consolidated) tensor is cut over a parallel
topology. See docs/ucl.md for the language.

Example:
    >>> from ucp import Topology
    >>> from ucp.grammar import load_spec
    >>> spec = load_spec('param "w" split tp dim 1')
    >>> spec.layout("w", (4, 6), Topology(tp=3)).pieces(2)[0].global_region
    ((0, 4), (4, 6))
"""

from ._bundled import bundled_spec_names, bundled_spec_text
from ._check import Problem
from ._error import UclError
from ._layout import DimLayout, ParamLayout, Piece
from ._parse import parse
from ._resolve import Rule
from ._spec import Match, Spec, bundled_spec, load_spec

__all__ = [
    "load_spec", "bundled_spec", "bundled_spec_names", "bundled_spec_text", "parse",
    "Spec", "ParamLayout", "Piece", "DimLayout", "Rule", "Match", "Problem", "UclError",
]
