"""ZeRO partition math and flat ranges, against independent references (torch slicing)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.resharder import chunk_blocks, flat_boxes, group_partition, param_partition

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@st.composite
def shape_and_range(draw):
    shape = draw(shapes)
    n = math.prod(shape)
    a = draw(st.integers(0, n))
    return shape, a, draw(st.integers(a, n))


@settings(max_examples=300, deadline=None)
@given(shape_and_range())
def test_flat_boxes_tile_the_range_each_contiguous(case):
    shape, start, stop = case
    t = torch.arange(math.prod(shape)).reshape(shape)
    covered = []
    for box, first in flat_boxes(shape, start, stop):
        block = t[tuple(slice(a, b) for a, b in box)].reshape(-1)
        # contiguous in row-major order, starting where it says
        assert torch.equal(block, torch.arange(first, first + block.numel()))
        covered += block.tolist()
    assert covered == list(range(start, stop))
    assert len(flat_boxes(shape, start, stop)) <= max(1, 2 * len(shape) - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=6), st.integers(1, 5), st.integers(1, 8))
def test_group_partitions_are_concat_pad_split(numels, dp, alignment):
    flat = torch.arange(1, sum(numels) + 1)
    padded = -(-flat.numel() // (alignment * dp)) * alignment * dp
    ref = torch.cat([flat, torch.zeros(padded - flat.numel(), dtype=flat.dtype)])
    offsets = [sum(numels[:i]) for i in range(len(numels))]
    for r in range(dp):
        p = group_partition(numels, dp, r, alignment)
        assert p.padded_numel == padded and p.partition_numel * dp == padded
        assert p.partition_numel % alignment == 0
        got = torch.zeros(p.partition_numel, dtype=flat.dtype)
        for i, a, b in p.overlaps():
            got[offsets[i] + a - p.start:offsets[i] + b - p.start] = flat[offsets[i] + a:offsets[i] + b]
        assert torch.equal(got, ref[r * p.partition_numel:(r + 1) * p.partition_numel])


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 100), st.integers(1, 6), st.integers(1, 8))
def test_param_partitions_cover_the_tensor_once(numel, dp, alignment):
    seen = []
    for r in range(dp):
        start, stop, part = param_partition(numel, dp, r, alignment)
        assert part == -(-math.ceil(numel / dp) // alignment) * alignment
        assert stop - start <= part and (start == stop or start == r * part)
        seen += range(start, stop)
    assert seen == list(range(numel))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=3).flatmap(
    lambda shape: st.tuples(st.just(tuple(shape)),
                            st.tuples(*(st.integers(1, s) for s in shape)),
                            st.lists(st.tuples(*(st.tuples(st.integers(0, s), st.integers(0, s))
                                                 for s in shape)), max_size=4),
                            st.integers(1, 64))))
def test_chunk_blocks_read_each_needed_chunk_once(case):
    shape, chunks, raw_boxes, max_items = case
    boxes = [tuple((min(a, b), max(a, b)) for a, b in box) for box in raw_boxes]
    blocks = chunk_blocks(boxes, shape, chunks, itemsize=1, max_bytes=max_items)
    owner = torch.zeros(shape, dtype=torch.int64)
    for region, n in blocks:
        sl = tuple(slice(a, b) for a, b in region)
        assert bool((owner[sl] == 0).all()), "blocks overlap"
        owner[sl] += 1
        # blocks are made of whole chunks (clipped at the array's end)
        for (a, b), c, s in zip(region, chunks, shape):
            assert a % c == 0 and (b % c == 0 or b == s)
        assert n == math.prod(-(-(b - a) // c) for (a, b), c in zip(region, chunks))
    for box in boxes:
        if all(a < b for a, b in box):
            assert bool((owner[tuple(slice(a, b) for a, b in box)] == 1).all()), "a needed chunk is unread"
    needed_chunks = set()
    for box in boxes:
        if all(a < b for a, b in box):
            import itertools
            needed_chunks.update(itertools.product(*(range(a // c, (b - 1) // c + 1)
                                                     for (a, b), c in zip(box, chunks))))
    assert sum(n for _, n in blocks) == len(needed_chunks)
