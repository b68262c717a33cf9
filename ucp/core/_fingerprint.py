"""Layout-independent fingerprints of tensors: pure maths, vectorised in torch, no I/O.

The fingerprint of a tensor ``T`` with ``n`` elements is::

    F(T) = sum over i < n of  r**i * (g(T.flat[i]) + C)   (mod 2**64)

where ``g`` is an element's bit pattern sign-extended to 64 bits (8-byte elements: their high
half folded into the low one, ``b ^ (b >> 32)``), ``r`` odd and ``C`` a constant (so zeros count
too). Because it is a sum over global flat indices, any piece of ``T`` -- a TP
slice (a box of the global shape), a ZeRO flat range, a chunk of a universal array, a fragment
of a native save -- has its own partial value (:func:`fingerprint_box`, :func:`fingerprint_flat`),
and the partial values of any partition of ``T`` add up (:func:`combine`) to ``F(T)``. Two
layouts of the same tensor therefore agree, whichever way each is cut; and a conversion bug that
moves, drops or changes elements (swapped halves, permuted heads, a zeroed moment) changes it:
every weight ``r**i`` is odd, so changing any one element always changes ``F``. Swapping two
elements ``d`` apart changes ``F`` by ``(g_a - g_b) * r**j * (r**d - 1)``; with ``r = 3 mod 8``,
``r**d - 1`` holds ``2**(2 + v)`` for ``d = 2**v * odd`` (even ``d``), and ``g_a - g_b`` holds at most
``2**32`` for elements of up to 4 bytes (8-byte ones fold their high half into the low one, so a
flipped sign still shows low), so such a swap is always seen in tensors of fewer than ``2**30``
elements, and otherwise misses only when ``d`` is a multiple of ``2**30``. Per element, the cost is
a widening copy and a fused multiply-and-sum.

Weights are separable: the flat index of an element of a box is ``base + sum_d i_d * stride_d``,
so its weight is ``r**base * prod_d (r**stride_d)**i_d``; a box is summed as a 2-D matrix
(rows x last dim) with a row-weight and a column-weight vector, a slab at a time so temporaries
stay in cache. uint64 arithmetic wraps modulo 2**64 (tests check every path against a pure-Python
reference).
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import numpy as np
import torch

from ucp.core import _fpkernel

__all__ = ["ALGORITHM", "bit_view", "combine", "fingerprint", "fingerprint_box", "fingerprint_flat",
           "fingerprint_tiles", "from_hex", "to_hex"]

#: Name recorded beside stored fingerprints; a new formula gets a new name.
ALGORITHM = "ucp-fp1"
MOD = 1 << 64
#: Odd multiplier of the index weights (r = 3 mod 8: multiplicative order 2**62).
R = 0x9E3779B97F4A7C1B
#: Added to every element's bits, so a zero still counts at its index.
C = 0x632BE59BD9B4E019
#: Columns per block and elements per slab (temporaries of a few MiB).
BLOCK = 1 << 14
SLAB = 1 << 16
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _signed(v: int) -> int:
    """``v`` mod 2**64 as a signed 64-bit value (what an int64 tensor holds)."""
    v %= MOD
    return v - MOD if v >= 1 << 63 else v


def bit_view(t: torch.Tensor) -> np.ndarray:
    """The bit patterns of ``t`` (on CPU) as a numpy view of signed integers of its element size.

    Raises:
        TypeError: a complex dtype, or elements of another size than 1, 2, 4 or 8 bytes.
    """
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    size = t.element_size()
    if size not in _INT or t.is_complex():
        raise TypeError(f"no fingerprint for dtype {t.dtype}: elements of {size} bytes")
    return t.detach().view(_INT[size]).numpy()


@functools.lru_cache(maxsize=64)
def _powers(base: int, n: int) -> torch.Tensor:
    """``base**k mod 2**64`` for k < n (int64), by doubling."""
    p = torch.empty(n, dtype=torch.int64)
    if n:
        p[0] = 1
    k = 1
    while k < n:
        m = min(k, n - k)
        torch.mul(p[:m], _signed(pow(base, k, MOD)), out=p[k:k + m])
        k += m
    return p


def _weighted(values: torch.Tensor, rows: torch.Tensor, col_base: int) -> int:
    """``sum_ij rows[i] * col_base**j * (g(values[i, j]) + C)`` for a 2-D ``values`` (mod 2**64).

    The per-element work runs in compiled C (:mod:`ucp.core._fpkernel`) or numpy, whose uint64
    arithmetic wraps by definition (and is faster here than torch's). The ``C`` part is
    ``C * sum(rows) * sum(col weights)``: no per-element work.
    """
    m, k = values.shape
    bits = bit_view(values)
    cols = _powers(col_base, min(k, BLOCK)).numpy().view(np.uint64)
    rw = np.ascontiguousarray(rows.numpy().view(np.uint64))
    col_sums = sum(pow(col_base, c0, MOD) * int(cols[:min(BLOCK, k - c0)].sum()) for c0 in range(0, k, BLOCK))
    total = 0
    for c0 in range(0, k, BLOCK):  # column blocks: weights col_base**c0 * cols
        block = bits[:, c0:c0 + BLOCK]
        total += pow(col_base, c0, MOD) * _row_sums(block, cols[:block.shape[1]], rw)
    return (total + C * col_sums * int(rw.sum())) % MOD


def _row_sums(bits: np.ndarray, cols: np.ndarray, rw: np.ndarray) -> int:
    """``sum_i rw[i] * sum_j cols[j] * g(bits[i, j])`` (mod 2**64): the compiled kernel of
    :mod:`ucp.core._fpkernel` when it can be had, else :func:`_numpy_row_sums`."""
    fn = _fpkernel.rows_function(bits.itemsize, _numpy_row_sums)
    if fn is not None and _fpkernel.fits(bits, cols, rw):
        return _fpkernel.call(fn, bits, cols, rw)
    return _numpy_row_sums(bits, cols, rw)


def _numpy_row_sums(bits: np.ndarray, cols: np.ndarray, rw: np.ndarray) -> int:
    """:func:`_row_sums` in numpy: a sign-extending copy into a reused buffer, then ``matmul``
    (its integer dot loop wraps, and runs 2-3x faster than ``einsum`` here), a slab of rows at a
    time so temporaries stay in cache."""
    m, k = bits.shape
    step = max(1, SLAB // max(1, k))
    buf = np.empty(min(m, step) * k, dtype=np.int64)
    total = 0
    for r0 in range(0, m, step):
        block = bits[r0:r0 + step]
        x = buf[:block.size].reshape(block.shape)
        np.copyto(x, block, casting="unsafe")  # sign-extends
        x = x.view(np.uint64)
        if bits.itemsize == 8:
            x ^= x >> np.uint64(32)
        s = x @ cols
        s *= rw[r0:r0 + step]
        total += int(s.sum())
    return total % MOD


def fingerprint_flat(values: torch.Tensor, offset: int = 0) -> int:
    """The partial fingerprint of elements ``offset .. offset + n`` of a tensor's flat (C-order)
    view, given as ``values`` (any shape; read in C order), e.g. a ZeRO partition without its
    padding.

    Example:
        >>> t = torch.randn(10)
        >>> combine([fingerprint_flat(t[:4], 0), fingerprint_flat(t[4:], 4)]) == fingerprint(t)
        True
    """
    flat = values.reshape(-1)
    n = flat.numel()
    full = n - n % BLOCK
    total = 0
    if full:  # whole blocks as a (blocks x BLOCK) matrix: row weights r**(offset + BLOCK * i)
        rows = _powers(pow(R, BLOCK, MOD), full // BLOCK).mul(_signed(pow(R, offset, MOD)))
        total += _weighted(flat[:full].view(-1, BLOCK), rows, R)
    if n > full:
        rows = torch.tensor([_signed(pow(R, offset + full, MOD))], dtype=torch.int64)
        total += _weighted(flat[full:].view(1, -1), rows, R)
    return total % MOD


def fingerprint_box(values: torch.Tensor, start: Sequence[int], shape: Sequence[int]) -> int:
    """The partial fingerprint of the box of a tensor of global ``shape`` whose first element is
    at ``start`` (one offset per dim) and whose values are ``values`` (the box's shape), e.g. a
    TP slice or a chunk.

    Raises:
        ValueError: ``start``/``values`` do not fit ``shape``.
    """
    shape, start = tuple(shape), tuple(start)
    if len(start) != len(shape) or values.dim() != len(shape) or any(
            s < 0 or s + n > g for s, n, g in zip(start, values.shape, shape)):
        raise ValueError(f"a box of shape {list(values.shape)} at {list(start)} does not fit in a "
                         f"tensor of shape {list(shape)}")
    if values.numel() == 0:
        return 0
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    base = sum(s * st for s, st in zip(start, strides))
    if values.dim() <= 1:
        return fingerprint_flat(values, base)
    rows = _powers(pow(R, strides[0], MOD), values.shape[0])
    for d in range(1, values.dim() - 1):
        rows = (rows[:, None] * _powers(pow(R, strides[d], MOD), values.shape[d])[None, :]).reshape(-1)
    rows = rows.mul(_signed(pow(R, base, MOD)))
    return _weighted(values.reshape(-1, values.shape[-1]), rows, R)


def fingerprint_tiles(tiles: torch.Tensor, first_row: int, shape: Sequence[int]) -> int:
    """The partial fingerprint of one row of tiles of a tensor seen as 3-D ``shape`` =
    ``(rows, cols, rest)``: ``tiles[J, i, j, t]`` (shape ``(n, r, c, rest)``, contiguous) holds
    element ``(first_row + i, J * c + j, t)``; tiles reaching past the tensor's last row or
    column are padding, left out whatever they hold. This is how a universal shard lays out a
    row of inner chunks, so a whole row is summed in two vectorised passes (full tiles, then
    the last, partial one) instead of one call per chunk.

    Raises:
        ValueError: the tiles do not fit ``shape``.
    """
    n, r, c, rest = tiles.shape
    rows, cols, rest_ = (int(x) for x in shape)
    if rest != rest_ or not 0 <= first_row < rows or n != -(-cols // c):
        raise ValueError(f"tiles of shape {list(tiles.shape)} from row {first_row} do not fit a "
                         f"tensor of shape {[rows, cols, rest_]}")
    width = cols * rest  # elements per row of the tensor
    valid = min(r, rows - first_row)
    row_w = torch.zeros(r, dtype=torch.int64)  # rows past the tensor's end weigh nothing
    row_w[:valid] = _powers(pow(R, width, MOD), valid).mul(_signed(pow(R, first_row * width, MOD)))
    full, last = divmod(cols, c)
    total = 0
    if full:  # row (J, i) weighs r**((first_row + i) * width + J * c * rest)
        tile_w = _powers(pow(R, c * rest, MOD), full)
        weights = (tile_w[:, None] * row_w[None, :]).reshape(-1)
        total += _weighted(tiles[:full].reshape(full * r, c * rest), weights, R)
    if last:
        weights = row_w.mul(_signed(pow(R, full * c * rest, MOD)))
        total += _weighted(tiles[full, :, :last].reshape(r, last * rest), weights, R)
    return total % MOD


def fingerprint(t: torch.Tensor) -> int:
    """The fingerprint of a whole tensor (its layout-independent value).

    Example:
        >>> a = torch.arange(6.).reshape(2, 3)
        >>> combine([fingerprint_box(a[:, :2], (0, 0), (2, 3)),
        ...          fingerprint_box(a[:, 2:], (0, 2), (2, 3))]) == fingerprint(a)
        True
    """
    return fingerprint_flat(t.detach().cpu(), 0)


def combine(parts: Iterable[int]) -> int:
    """The fingerprint of a tensor from the partial values of a partition of it."""
    return sum(parts) % MOD


def to_hex(value: int) -> str:
    """A fingerprint as recorded in JSON metadata: 16 lowercase hex digits."""
    return f"{value % MOD:016x}"


def from_hex(text: str) -> int:
    """The inverse of :func:`to_hex`.

    Raises:
        ValueError: ``text`` is not 16 hex digits.
    """
    if not isinstance(text, str) or len(text) != 16:
        raise ValueError(f"{text!r} is not a fingerprint (16 hex digits)")
    return int(text, 16)
