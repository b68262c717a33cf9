"""Property tests: a tensor's fingerprint equals the combination of its pieces' partial values over
any partition (TP boxes, ZeRO flat partitions with padding, chunk grids), for every dtype ucp
stores; every path agrees with a pure-Python reference of the formula; and the classic silent
bugs (swapped halves, permuted heads, a zeroed moment, one changed element) change it."""

from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucp.core import _fingerprint as F
from ucp.core import _fpkernel
from ucp.core._fingerprint import (combine, fingerprint, fingerprint_box, fingerprint_flat, fingerprint_tiles,
                                   from_hex, to_hex)
from ucp.resharder._zero import flat_boxes, group_partition, param_partition

@pytest.fixture(autouse=True, scope="module", params=["c", "numpy"])
def kernel(request, tmp_path_factory):
    """Every test runs with the compiled kernel (``c``: it must build here) and with numpy alone."""
    old = {k: os.environ.get(k) for k in ("UCP_FINGERPRINT_KERNEL", "UCP_CACHE_DIR")}
    os.environ.update(UCP_FINGERPRINT_KERNEL=request.param, UCP_CACHE_DIR=str(tmp_path_factory.mktemp("cache")))
    _fpkernel.reset()
    yield request.param
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    _fpkernel.reset()


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def reference(t: torch.Tensor) -> int:
    """The formula of ucp.core._fingerprint, element by element with Python integers."""
    size = t.element_size()
    raw = t.reshape(-1).contiguous().view(torch.uint8).tolist()
    total = 0
    for i in range(t.numel()):
        b = int.from_bytes(bytes(raw[i * size:(i + 1) * size]), "little", signed=True) % F.MOD
        if size == 8:
            b ^= b >> 32
        total += pow(F.R, i, F.MOD) * (b + F.C)
    return total % F.MOD


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)


shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_matches_the_reference_formula(shape, dtype, seed):
    t = random_tensor(shape, dtype, seed)
    assert fingerprint(t) == reference(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_blocked_paths_match_the_reference(dtype, monkeypatch):
    """Shapes past the block/slab sizes take the blocked paths (small sizes keep the reference fast)."""
    monkeypatch.setattr(F, "BLOCK", 8)
    monkeypatch.setattr(F, "SLAB", 16)
    F._powers.cache_clear()
    t = random_tensor((5, 37), dtype, 3)
    want = reference(t)
    assert fingerprint(t) == want
    assert combine(fingerprint_box(t[a:b], (a, 0), t.shape) for a, b in [(0, 2), (2, 5)]) == want
    F._powers.cache_clear()


@st.composite
def cuts(draw, n: int):
    """Sorted cut points splitting ``range(n)`` into consecutive pieces (some possibly empty)."""
    points = draw(st.lists(st.integers(0, n), max_size=4))
    return [0, *sorted(points), n]


@SETTINGS
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31), data=st.data())
def test_boxes_of_a_grid_combine(shape, dtype, seed, data):
    """Any grid of boxes (TP splits along several dims at once, chunk grids) adds up."""
    t = random_tensor(shape, dtype, seed)
    edges = [data.draw(cuts(n)) for n in shape]
    parts = []
    for idx in itertools.product(*[range(len(e) - 1) for e in edges]):
        region = [(e[i], e[i + 1]) for e, i in zip(edges, idx)]
        box = t[tuple(slice(lo, hi) for lo, hi in region)]
        parts.append(fingerprint_box(box, [lo for lo, _ in region], shape))
    assert combine(parts) == fingerprint(t)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 3)), tile=st.tuples(
    st.integers(1, 9), st.integers(1, 9)), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_rows_of_tiles_combine_and_padding_is_left_out(shape, tile, dtype, seed):
    """A universal shard's rows of inner chunks (tiles padded past the edges, here with garbage)
    add up to the fingerprint; moving one tile changes it."""
    t = random_tensor(shape, dtype, seed)
    r, c = tile
    n = -(-shape[1] // c)
    parts, rows = [], []
    for first in range(0, shape[0], r):
        tiles = random_tensor((n, r, c, shape[2]), dtype, seed + 1)  # garbage where padding is
        for j in range(n):
            block = t[first:first + r, j * c:(j + 1) * c]
            tiles[j, :block.shape[0], :block.shape[1]] = block
        parts.append(fingerprint_tiles(tiles, first, shape))
        rows.append(tiles)
    assert combine(parts) == fingerprint(t)
    unpadded = shape[0] >= r and shape[1] % c == 0  # row 0 holds no padding: every byte counts
    if n > 1 and unpadded and not torch.equal(rows[0][0].view(torch.uint8), rows[0][1].view(torch.uint8)):
        swapped = rows[0][[1, 0, *range(2, n)]]
        assert fingerprint_tiles(swapped, 0, shape) != parts[0]


def test_tiles_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        fingerprint_tiles(torch.zeros(2, 4, 4, 1), 0, (8, 12, 1))  # 12 columns are 3 tiles of 4
    with pytest.raises(ValueError, match="do not fit"):
        fingerprint_tiles(torch.zeros(3, 4, 4, 1), 8, (8, 12, 1))  # past the last row


@SETTINGS
@given(numels=st.lists(st.integers(0, 40), min_size=1, max_size=4), dp=st.integers(1, 5),
       alignment=st.sampled_from([1, 2, 4, 8]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**31))
def test_zero_flat_partitions_with_padding_combine(numels, dp, alignment, dtype, seed):
    """ZeRO-1/2: parameters laid end to end, padded, cut into dp partitions; each parameter's
    fingerprint is the sum over partitions of its flat range (the padding left out), whether
    each range is fingerprinted flat or as the boxes of its global shape."""
    shapes_ = [(n,) if n % 3 else (n // 3, 3) for n in numels]
    tensors = [random_tensor(s, dtype, seed + i) for i, s in enumerate(shapes_)]
    buffer = torch.cat([t.reshape(-1) for t in tensors])
    buffer = torch.cat([buffer, torch.zeros(group_partition(numels, dp, 0, alignment).padded_numel
                                            - buffer.numel(), dtype=dtype)])
    flat = [0] * len(tensors)
    boxed = [0] * len(tensors)
    for rank in range(dp):
        p = group_partition(numels, dp, rank, alignment)
        part = buffer[p.start:p.stop]
        for i, lo, hi in p.overlaps():
            piece = part[p.offsets[i] + lo - p.start:p.offsets[i] + hi - p.start]
            flat[i] += fingerprint_flat(piece, lo)
            pos = 0
            for region, first in flat_boxes(shapes_[i], lo, hi):
                size = math.prod(b - a for a, b in region)
                box = piece[pos:pos + size].reshape([b - a for a, b in region])
                boxed[i] += fingerprint_box(box, [a for a, _ in region], shapes_[i])
                pos += size
                assert first == lo + pos - size
    for t, f, b in zip(tensors, flat, boxed):
        assert combine([f]) == fingerprint(t) == combine([b])


@SETTINGS
@given(numel=st.integers(0, 60), dp=st.integers(1, 6), alignment=st.sampled_from([1, 2, 4]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_zero3_partitions_combine(numel, dp, alignment, dtype, seed):
    t = random_tensor((numel,), dtype, seed)
    parts = []
    for rank in range(dp):
        start, stop, _ = param_partition(numel, dp, rank, alignment)
        parts.append(fingerprint_flat(t[start:stop], start))
    assert combine(parts) == fingerprint(t)


def test_classic_silent_bugs_change_the_fingerprint():
    w = random_tensor((64, 16), torch.bfloat16, 1)  # a fused gate/up weight: [gate; up]
    base = fingerprint(w)
    assert fingerprint(torch.cat([w[32:], w[:32]])) != base  # gate and up swapped
    heads = w.reshape(4, 16, 16)
    assert fingerprint(heads[[1, 0, 2, 3]].reshape(64, 16)) != base  # two GQA heads swapped
    assert fingerprint(torch.zeros_like(w)) != base  # a zeroed moment
    for i in (0, 77, w.numel() - 1):  # any one element changed
        bad = w.clone().reshape(-1)
        bad[i] = -bad[i] if bad[i] != 0 else 1
        assert fingerprint(bad.reshape(w.shape)) != base
    assert fingerprint(torch.zeros(3)) != fingerprint(torch.zeros(4))  # zeros count by index


def test_a_box_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match=r"does not fit in a tensor of shape \[4, 4\]"):
        fingerprint_box(torch.zeros(2, 3), (3, 0), (4, 4))
    with pytest.raises(TypeError, match="complex"):
        fingerprint(torch.zeros(2, dtype=torch.complex64))


def test_hex_round_trip():
    value = fingerprint(torch.arange(10.0))
    assert from_hex(to_hex(value)) == value and len(to_hex(value)) == 16
    with pytest.raises(ValueError, match="16 hex digits"):
        from_hex("abc")


def test_the_compiled_kernel_is_built_once_and_used(kernel, tmp_path, monkeypatch):
    if kernel != "c":
        assert _fpkernel.rows_function(4, F._numpy_row_sums) is None  # numpy alone when told so
        return
    monkeypatch.setenv("UCP_CACHE_DIR", str(tmp_path))
    _fpkernel.reset()
    t = random_tensor((3, 5), torch.float32, 1)
    assert fingerprint(t) == reference(t)
    assert _fpkernel.rows_function(4, F._numpy_row_sums) is not None
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
    _fpkernel.reset()


def test_without_a_compiler_numpy_gives_the_same_values(kernel, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("UCP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc, gcc or $CC to be found
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("UCP_FINGERPRINT_KERNEL", "auto")
    _fpkernel.reset()
    t = random_tensor((4, 6), torch.bfloat16, 2)
    with caplog.at_level(logging.INFO, logger="ucp.core._fpkernel"):
        assert fingerprint(t) == reference(t)
    assert "using numpy" in caplog.text and "no C compiler" in caplog.text
    monkeypatch.setenv("UCP_FINGERPRINT_KERNEL", "c")
    _fpkernel.reset()
    with pytest.raises(_fpkernel.KernelUnavailable, match="UCP_FINGERPRINT_KERNEL=c"):
        fingerprint(t)
    _fpkernel.reset()


def test_a_kernel_that_sums_otherwise_is_not_used(kernel, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("UCP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("UCP_FINGERPRINT_KERNEL", "auto")
    real = _fpkernel.call
    monkeypatch.setattr(_fpkernel, "call", lambda *a: real(*a) + 1)  # a miscompiled build
    _fpkernel.reset()
    t = random_tensor((4, 6), torch.float32, 3)
    with caplog.at_level(logging.INFO, logger="ucp.core._fpkernel"):
        assert fingerprint(t) == reference(t)
    assert "differ from numpy's" in caplog.text
    _fpkernel.reset()


def test_processes_building_the_kernel_at_once_share_one_file(kernel, tmp_path):
    code = ("import torch; from ucp.core._fingerprint import fingerprint; "
            "print(fingerprint(torch.arange(1000, dtype=torch.float32)))")
    env = {**os.environ, "UCP_CACHE_DIR": str(tmp_path), "UCP_FINGERPRINT_KERNEL": kernel}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert set(outs) == {str(reference(torch.arange(1000, dtype=torch.float32)))}
    built = [p.suffix for p in tmp_path.iterdir()]
    assert built == ([".so"] if kernel == "c" else [])  # no temporary file left; none built for numpy
