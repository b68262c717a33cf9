"""Property tests: cutting a tensor for every rank and consolidating the fragments is the identity.

Specs, shapes and topologies are drawn at random (tp 1-8, pp 1-4, ep 1-4, dp 1-2; plain, fused,
grouped, padded and uneven splits; transposes; pipeline placement), and the layout invariants
behind the round trip are checked too: the sources' pieces tile the canonical tensor exactly
once, and each rank's pieces tile its local tensor except for its padding.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucp import Topology
from ucp.grammar import load_spec

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


@st.composite
def topologies(draw):
    return Topology(tp=draw(st.integers(1, 8)), pp=draw(st.integers(1, 4)),
                    ep=draw(st.integers(1, 4)), dp=draw(st.integers(1, 2)))


@st.composite
def dim_splits(draw, n: int):
    """A split clause's options for a dim cut into ``n`` shards, and a length that fits them."""
    kind = draw(st.sampled_from(["plain", "balanced", "parts", "parts_balanced", "equal",
                                 "groups", "groups_balanced", "pad_multiple", "pad_to"]))
    if kind == "plain":
        return "", n * draw(st.integers(0, 3))
    if kind == "balanced":
        unit = draw(st.integers(1, 3))
        return f"balanced by {unit}", unit * draw(st.integers(0, 2 * n + 1))
    if kind in ("parts", "parts_balanced"):
        scale = n if kind == "parts" else 1
        parts = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        sizes = [scale * p for p in parts]
        return f"parts [{', '.join(map(str, sizes))}]" + (" balanced" if scale == 1 else ""), sum(sizes)
    if kind == "equal":
        m = draw(st.integers(1, 3))
        return f"parts {m}", m * n * draw(st.integers(1, 2))
    if kind in ("groups", "groups_balanced"):
        groups = n * draw(st.integers(1, 2)) if kind == "groups" else draw(st.integers(1, 2 * n))
        sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
        text = f"groups {groups} [{', '.join(map(str, sizes))}]"
        return text + (" balanced" if kind == "groups_balanced" else ""), groups * sum(sizes)
    size = draw(st.integers(1, 20))
    if kind == "pad_multiple":
        return f"pad {size} to multiple of {draw(st.integers(1, 4))}", size
    padded = n * (-(-size // n) + draw(st.integers(0, 2)))
    return f"pad {size} to {padded}", size


@st.composite
def cases(draw):
    """(spec text, canonical name, shape, topology, dtype)."""
    topo = draw(topologies())
    ndim = draw(st.integers(1, 3))
    free = ["tp", "ep", "dp", "sp"]
    clauses, shape = [], [draw(st.integers(1, 4)) for _ in range(ndim)]
    for dim in draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=2)):
        count = draw(st.integers(1, min(2, len(free))))
        axes = [free.pop(draw(st.integers(0, len(free) - 1))) for _ in range(count)]
        options, shape[dim] = draw(dim_splits(math.prod(topo.size(a) for a in axes)))
        clauses.append(f"split {', '.join(axes)} dim {dim} {options}")
    for axis in free:
        policy = draw(st.sampled_from(["", "check", "average", "first", None]))
        if policy is not None:
            clauses.append(f"replicate {axis} {policy}")
    if draw(st.booleans()):
        perm = draw(st.permutations(range(ndim)))
        clauses.append(f"transpose [{', '.join(map(str, perm))}]")
    placement = draw(st.sampled_from(["index", "stage", "replicate"]))
    header, name = "", "block.w"
    if placement == "index":
        counts = draw(st.lists(st.integers(0, 3), min_size=topo.pp, max_size=topo.pp)
                      .filter(lambda c: sum(c) > 0))
        header = f"index {{layer}} over pp = [{', '.join(map(str, counts))}]\n"
        name = f"block.{draw(st.integers(0, sum(counts) - 1))}.w"
        pattern = "block.{layer}.w"
    else:
        pattern = name
        clauses.append("replicate pp" if placement == "replicate" else
                       "stage " + draw(st.sampled_from(["first", "last", "first, last", "last, 0"])))
    text = f'{header}param "{pattern}"\n    ' + "\n    ".join(clauses) + "\n"
    return text, name, tuple(shape), topo, draw(st.sampled_from(DTYPES))


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-2**40, 2**40, shape, generator=g, dtype=dtype)


def _slices(region):
    return tuple(slice(a, b) for a, b in region)


@SETTINGS
@given(cases(), st.integers(0, 2**31 - 1))
def test_cut_then_consolidate_is_identity(case, seed):
    text, name, shape, topo, dtype = case
    spec = load_spec(text)
    full = _random(shape, dtype, seed)
    layout = spec.layout(name, shape, topo)
    fragments = {r: spec.cut(name, full, topo, r) for r in layout.ranks()}
    for rank, frag in fragments.items():
        assert tuple(frag.shape) == layout.local_shape(rank)
        assert frag.dtype == dtype
    back = spec.consolidate(name, fragments, topo)
    assert back.dtype == dtype and torch.equal(back, full), text
    needed_only = {r: fragments[r] for r in layout.needed()}
    assert torch.equal(spec.consolidate(name, needed_only, topo, global_shape=shape), full)


@SETTINGS
@given(cases())
def test_pieces_tile_canonical_and_local_tensors(case):
    text, name, shape, topo, _ = case
    layout = load_spec(text).layout(name, shape, topo)
    cover = torch.zeros(shape, dtype=torch.int32)
    for rank in layout.sources():
        for piece in layout.pieces(rank):
            cover[_slices(piece.global_region)] += 1
    assert bool((cover == 1).all()), text
    for rank in layout.ranks():
        held = torch.zeros(layout.local_shape(rank), dtype=torch.int32)
        for piece in layout.pieces(rank):
            held[_slices(piece.local_region)] += 1
        padding = torch.zeros_like(held)
        for dim, start, stop in layout.padding(rank):
            index = [slice(None)] * held.dim()
            index[dim] = slice(start, stop)
            padding[tuple(index)] = 1
        assert bool((held <= 1).all()), text  # no two pieces overlap
        assert bool(((held == 1) ^ (padding == 1)).all()), text  # the rest is padding, exactly


@SETTINGS
@given(cases())
def test_local_and_canonical_names_are_inverse(case):
    text, name, _, topo, _ = case
    spec = load_spec(text)
    holders = spec.holders(name, topo)
    assert holders, text
    for rank in range(topo.world_size):
        local = spec.local_name(name, topo, rank)
        assert (local is not None) == (rank in holders)
        if local is not None:
            assert local == holders[rank]
            assert spec.canonical_name(local, topo, rank) == name
