"""Shard files of universal arrays, encoded a row of inner chunks at a time.

The format is the one :mod:`ucp.universal._shard` describes (inner chunks, each followed by its CRC32C,
then the index). ucp's chunk shapes cut only the two leading dims (:func:`ucp.universal.chunk_shape`),
so an array seen as 3-D ``(rows, cols, rest)`` has inner chunks ``(r, c, rest)`` and one *row* of
inner chunks (all that share a dim-0 index) is ``rows r .. r + r`` of the array, re-laid tile by
tile. Here each such row is re-laid with one strided copy into a buffer that is reused from row
to row and array to array (fresh memory costs more in page faults than the copy itself), its
chunks' CRC32Cs are computed on the buffer, and so, with ``prints``, is its fingerprint, in two
vectorised passes (:func:`ucp.core._fingerprint.fingerprint_tiles`) instead of one call per chunk;
the fingerprint runs on a helper thread while the row is written (numpy lets go of the GIL), and
is waited for before the buffer is re-used.
The buffers handed out are views of that buffer: a writer must consume them in order (a local
write does; a remote one copies each as it goes).
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from crc32c import crc32c

from ucp.core._fingerprint import fingerprint_tiles

from ._shard import EMPTY

__all__ = ["RowBuffer", "TiledShard", "tiles_fit"]

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The helper thread that fingerprints rows of tiles while they are written (one per process)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ucp-fingerprint")
        return _POOL


def tiles_fit(shape: Sequence[int], inner: Sequence[int]) -> bool:
    """Whether inner chunks ``inner`` cut only the two leading dims of ``shape`` (what
    :class:`TiledShard` encodes)."""
    return len(shape) >= 1 and len(shape) == len(inner) and tuple(inner[2:]) == tuple(shape[2:]) \
        and all(n > 0 for n in shape)


def as_3d(a: np.ndarray | Sequence[int]) -> tuple[int, int, int]:
    """``(rows, cols, rest)`` of a shape (1-D arrays are one column)."""
    shape = a.shape if isinstance(a, np.ndarray) else tuple(a)
    return (shape[0], 1, 1) if len(shape) == 1 else (shape[0], shape[1], math.prod(shape[2:]))


class RowBuffer:
    """A reusable byte buffer that grows to the largest row asked for (one per writer)."""

    def __init__(self) -> None:
        self._buf = np.empty(0, dtype=np.uint8)

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:  # type: ignore[type-arg]
        """A C-contiguous array of ``shape`` over the buffer (its old contents: overwrite them)."""
        n = math.prod(shape) * dtype.itemsize
        if self._buf.nbytes < n:
            self._buf = np.empty(n, dtype=np.uint8)
        return self._buf[:n].view(dtype).reshape(shape)


class TiledShard(Sequence):  # type: ignore[type-arg]
    """The buffers of one shard file (``idx``: its index in the shard grid, which cuts dim 0
    only), made one row of inner chunks at a time into ``rows``'s buffer.

    With ``prints`` (a dict), the partial fingerprint of each row, as encoded, goes into it
    under the row's global index (computed on a helper thread: call :meth:`settle` once the
    shard is written, before reading ``prints`` or re-using the row buffer); the rows of all
    shards add up to the array's fingerprint. Iterating again (a retried write) makes the same
    bytes and the same fingerprints.
    """

    def __init__(self, data: np.ndarray, inner: Sequence[int], shard: Sequence[int], idx: Sequence[int], *,
                 rows: RowBuffer, prints: dict[int, int] | None = None) -> None:
        if not tiles_fit(data.shape, inner):
            raise ValueError(f"inner chunks {list(inner)} cut more than the two leading dims of {list(data.shape)}")
        self.data, self.view = data, data.reshape(as_3d(data))
        self.r, self.c, self.rest = as_3d(inner)
        nrows, ncols, _ = self.view.shape
        self.ncol = -(-ncols // self.c)  # inner chunks per row
        per_shard = shard[0] // self.r  # rows of inner chunks per shard
        self.first = idx[0] * per_shard
        self.nrow = max(0, min(per_shard, -(-nrows // self.r) - self.first))  # rows inside the array
        self.buffer, self.prints = rows, prints
        self.nbytes = self.r * self.c * self.rest * data.itemsize
        index = np.full((per_shard * self.ncol, 2), EMPTY, dtype="<u8")
        cells = self.nrow * self.ncol
        index[:cells, 0] = np.arange(cells, dtype=np.uint64) * (self.nbytes + 4)
        index[:cells, 1] = self.nbytes + 4
        raw = index.tobytes()
        self.index = raw + struct.pack("<I", crc32c(raw))
        self._row: tuple[int, np.ndarray, list[bytes]] | None = None
        self._pending: tuple[int, Future[int]] | None = None

    def __len__(self) -> int:
        return 2 * self.nrow * self.ncol + 1

    def __getitem__(self, i: int) -> memoryview | bytes:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if i == len(self) - 1:
            return self.index
        if not 0 <= i < len(self) - 1:
            raise IndexError(i)
        row, col = divmod(i // 2, self.ncol)
        if self._row is None or self._row[0] != row:
            self._row = row, *self._encode(self.first + row)
        tiles, crcs = self._row[1], self._row[2]
        return memoryview(tiles[col].reshape(-1).view(np.uint8)) if i % 2 == 0 else crcs[col]

    def _encode(self, grow: int) -> tuple[np.ndarray, list[bytes]]:
        """Row ``grow`` (global) of inner chunks: the tiles ``(ncol, r, c, rest)``, padded with
        zeros past the array's edge, and each tile's CRC32C as stored."""
        r, c, rest, n = self.r, self.c, self.rest, self.ncol
        self.settle()  # the buffer is about to be overwritten
        block = self.view[grow * r:(grow + 1) * r]  # (valid rows, cols, rest)
        valid, cols = block.shape[0], block.shape[1]
        tiles = self.buffer.take((n, r, c, rest), self.data.dtype)
        lay = tiles.transpose(1, 0, 2, 3)  # (r, ncol, c, rest): the tiles in the array's order
        full, last = divmod(cols, c)
        if full:
            lay[:valid, :full] = block[:, :full * c].reshape(valid, full, c, rest)
        if last:
            lay[:valid, full, :last] = block[:, full * c:]
            lay[:, full, last:] = 0
        if valid < r:
            lay[valid:] = 0
        crcs = [struct.pack("<I", crc32c(memoryview(t.reshape(-1).view(np.uint8)))) for t in tiles]
        if self.prints is not None:
            self._pending = grow, _pool().submit(fingerprint_tiles, torch.from_numpy(tiles), grow * r,
                                                 self.view.shape)
        return tiles, crcs

    def settle(self) -> None:
        """Waits for the fingerprint of the last row encoded, and stores it in ``prints``."""
        if self._pending is not None:
            grow, future = self._pending
            self._pending = None
            assert self.prints is not None
            self.prints[grow] = future.result()

    def total(self) -> int:
        return len(self.index) + self.nrow * self.ncol * (self.nbytes + 4)
