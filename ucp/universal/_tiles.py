"""Shard files of universal arrays, encoded a row of inner chunks at a time.

The format is the one :mod:`ucp.universal._shard` describes (inner chunks, each followed by its CRC32C,
then the index). ucp's chunk shapes cut only the two leading dims (:func:`ucp.universal.chunk_shape`),
so an array seen as 3-D ``(rows, cols, rest)`` has inner chunks ``(r, c, rest)`` and one *row* of
inner chunks (all that share a dim-0 index) is ``rows r .. r + r`` of the array, re-laid tile by
tile. Here each such row is re-laid with one strided copy into a buffer that is reused from row
to row and array to array (fresh memory costs more in page faults than the copy itself), its
chunks' CRC32Cs are computed on the buffer, and so, with ``prints``, is its fingerprint, in two
vectorised passes (:func:`ucp.core._fingerprint.fingerprint_tiles`) instead of one call per chunk;
the fingerprint runs on a helper thread while the row and the next ones are written (numpy lets go
of the GIL): a ring of :data:`ROWS_IN_FLIGHT` buffers lets it lag the writes, and a buffer is
re-used only once the fingerprint reading it is done.
The buffers handed out are views of that buffer: a writer must consume them in order (a local
write does; a remote one copies each as it goes).
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as cf_wait

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


#: Rows of tiles whose fingerprints may still be running while later rows are encoded (each holds
#: its own buffer): the fingerprints lag the writes instead of holding them up.
ROWS_IN_FLIGHT = 4


class RowBuffer:
    """Reusable byte buffers that grow to the largest row asked for (one set per writer): a ring
    of ``slots``, so a row's buffer is re-used only once ``slots - 1`` later rows were taken, and
    then only after the fingerprint still reading it (:meth:`hold`) is done."""

    def __init__(self, slots: int = ROWS_IN_FLIGHT) -> None:
        self._bufs = [np.empty(0, dtype=np.uint8) for _ in range(max(1, slots))]
        self._busy: list[Future[int] | None] = [None] * len(self._bufs)
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:  # type: ignore[type-arg]
        """A C-contiguous array of ``shape`` over the next buffer of the ring (its old contents:
        overwrite them); waits for the fingerprint last held on that buffer."""
        k = self._next
        self._next = (k + 1) % len(self._bufs)
        busy, self._busy[k] = self._busy[k], None
        if busy is not None:
            cf_wait([busy])  # its outcome is collected by the shard that submitted it
        n = math.prod(shape) * dtype.itemsize
        if self._bufs[k].nbytes < n:
            self._bufs[k] = np.empty(n, dtype=np.uint8)
        self._last = k
        return self._bufs[k][:n].view(dtype).reshape(shape)

    def hold(self, future: Future[int]) -> None:
        """The buffer last taken is read by ``future`` until it is done."""
        self._busy[self._last] = future


class TiledShard(Sequence):  # type: ignore[type-arg]
    """The buffers of one shard file (``idx``: its index in the shard grid, which cuts dim 0
    only), made one row of inner chunks at a time into ``rows``'s buffer.

    With ``prints`` (a dict), the partial fingerprint of each row, as encoded, goes into it
    under the row's global index (computed on a helper thread while later rows are encoded and
    written: call :meth:`settle` before reading ``prints``); the rows of all shards add up to the
    array's fingerprint. Iterating again (a retried write) makes the same
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
        self._pending: list[tuple[int, Future[int]]] = []

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
            future = _pool().submit(fingerprint_tiles, torch.from_numpy(tiles), grow * r, self.view.shape)
            self.buffer.hold(future)  # the ring re-uses this buffer once the fingerprint is done
            self._pending.append((grow, future))
        return tiles, crcs

    def settle(self) -> None:
        """Waits for the fingerprints of the rows encoded so far, and stores them in ``prints``."""
        while self._pending:
            grow, future = self._pending.pop(0)
            assert self.prints is not None
            self.prints[grow] = future.result()

    def done(self) -> bool:
        """Whether every fingerprint submitted so far is done (:meth:`settle` will not wait)."""
        return all(f.done() for _, f in self._pending)

    def total(self) -> int:
        return len(self.index) + self.nrow * self.ncol * (self.nbytes + 4)
