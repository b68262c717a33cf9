"""ucp's on-disk chunk layout for universal arrays: zarr v3 ``sharding_indexed``.

An array is cut into *inner chunks* (the unit a reader reads: small enough that a target rank
reads little it does not need) that are stored together in *shard* files (``<array>/c.i.j``,
beside the array's ``zarr.json``; ``<array>/c/i/j`` in format 1, a directory per dim: few files and
directories, so writing costs what the bytes cost). In a shard, each inner chunk that overlaps the
array is its raw little-endian bytes (edge chunks padded with zeros) followed by their CRC32C;
the shard ends with its index, ``(offset, nbytes)`` as little-endian uint64 per inner chunk in C
order (``2**64 - 1`` twice for a chunk wholly outside the array), followed by the index's CRC32C.
That is exactly zarr v3's sharding codec with codecs ``[bytes, crc32c]`` for both the chunks and
the index, so zarr (or any zarr v3 reader) reads these arrays; ucp's own readers read inner
chunks directly by byte range.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import struct
import threading
from collections.abc import Sequence
from typing import Any, Mapping

import numpy as np
from crc32c import crc32c

from ucp.storage import open_regular, retry_call
from ucp.storage._stats import count_read

__all__ = ["ChunkReader", "Layout", "ShardParts", "layout_of", "parse_index", "shard_shape", "sharded_meta"]

#: Largest shard file: one PUT on an object store, and what a remote write holds in memory.
SHARD_BYTES = 1 << 30
EMPTY = 2**64 - 1
_LE = {"name": "bytes", "configuration": {"endian": "little"}}
_CODECS = ([_LE, {"name": "crc32c"}], [{"name": "bytes"}, {"name": "crc32c"}])
_PLAIN_TYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                          "uint64", "float16", "float32", "float64"})


def shard_shape(shape: Sequence[int], inner: Sequence[int], itemsize: int,
                limit: int | None = None) -> tuple[int, ...]:
    """The whole array rounded up to whole inner chunks, cut along dim 0 (in whole inner chunks)
    while a shard would exceed ``limit`` bytes."""
    limit = SHARD_BYTES if limit is None else limit
    grid = [-(-s // c) * c for s, c in zip(shape, inner)]
    row = math.prod(grid[1:]) * itemsize * inner[0]  # bytes of one row of inner chunks
    rows = max(1, min(grid[0] // inner[0], limit // max(1, row)))
    return (rows * inner[0], *grid[1:])


def sharded_meta(inner: Sequence[int], shard: Sequence[int]) -> dict[str, Any]:
    """The ``chunk_grid`` and ``codecs`` entries of an array's ``zarr.json``."""
    return {"chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard)}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": list(inner), "codecs": [_LE, {"name": "crc32c"}],
                "index_codecs": [_LE, {"name": "crc32c"}], "index_location": "end"}}]}


class ShardParts(Sequence):  # type: ignore[type-arg]
    """The buffers of one shard file, in order, made on demand: a local write streams them (one
    inner chunk's copy alive at a time) and may iterate again on a retry.

    With ``prints`` (a dict), the partial fingerprint of each inner chunk's bytes, as they are
    handed out, goes into it under the chunk's index (:mod:`ucp.core._fingerprint`: the chunks of an
    array add up to the array's fingerprint).
    """

    def __init__(self, data: np.ndarray, inner: tuple[int, ...], shard: tuple[int, ...],
                 idx: tuple[int, ...], prints: dict[tuple[int, ...], int] | None = None) -> None:
        self.data, self.inner, self.prints = data, inner, prints
        per = [s // c for s, c in zip(shard, inner)]
        first = [i * p for i, p in zip(idx, per)]
        self.cells = []  # (position in the shard's index, global inner-chunk index)
        for pos, off in enumerate(np.ndindex(*per)):
            g = tuple(f + o for f, o in zip(first, off))
            if all(gi * c < s for gi, c, s in zip(g, inner, data.shape)):
                self.cells.append((pos, g))
        self.nbytes = math.prod(inner) * data.itemsize
        index = np.full((math.prod(per), 2), EMPTY, dtype="<u8")
        for k, (pos, _) in enumerate(self.cells):
            index[pos] = (k * (self.nbytes + 4), self.nbytes + 4)
        raw = index.tobytes()
        self.index = raw + struct.pack("<I", crc32c(raw))
        self._last: tuple[int, memoryview] | None = None

    def __len__(self) -> int:
        return 2 * len(self.cells) + 1

    def __getitem__(self, i: int) -> memoryview | bytes:  # type: ignore[override]
        if i < 0:
            i += len(self)
        if i == 2 * len(self.cells):
            return self.index
        if not 0 <= i < 2 * len(self.cells):
            raise IndexError(i)
        k = i // 2
        if self._last is None or self._last[0] != k:
            self._last = k, self._chunk(self.cells[k][1])
        view = self._last[1]
        return view if i % 2 == 0 else struct.pack("<I", crc32c(view))

    def _chunk(self, g: tuple[int, ...]) -> memoryview:
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(g, self.inner, self.data.shape))
        block = self.data[region]
        valid = tuple(slice(0, b) for b in block.shape)
        if block.shape != self.inner:  # an edge chunk: stored at full size, padded with zeros
            full = np.zeros(self.inner, dtype=self.data.dtype)
            full[valid] = block
            block = full
        out = np.ascontiguousarray(block)
        if self.prints is not None:  # of the bytes handed out, padding left out
            self.prints[g] = _chunk_print(out[valid], [r.start for r in region], self.data.shape)
        return memoryview(out.reshape(-1).view(np.uint8))

    def total(self) -> int:
        return len(self.cells) * (self.nbytes + 4) + len(self.index)


def _chunk_print(block: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> int:
    import torch

    from ucp.core._fingerprint import fingerprint_box

    return fingerprint_box(torch.from_numpy(block), start, shape)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an array's chunks lie in its files (for ucp's direct readers)."""

    shape: tuple[int, ...]
    dtype: np.dtype  # type: ignore[type-arg]
    chunks: tuple[int, ...]  # the unit of reading: inner chunks (sharded) or chunks (plain)
    shard: tuple[int, ...] | None  # None: one file per chunk
    separator: str = "/"  # of the chunk keys: "c/i/j" (format 1), "c.i.j" (format 2: no directories)

    @property
    def per_shard(self) -> tuple[int, ...]:
        assert self.shard is not None
        return tuple(s // c for s, c in zip(self.shard, self.chunks))

    def locate(self, idx: Sequence[int]) -> tuple[str, int]:
        """The file key (``c/...``) holding inner chunk ``idx`` and its position in the index."""
        if self.shard is None:
            return self.separator.join(("c", *map(str, idx))), 0
        per = self.per_shard
        sidx = [i // p for i, p in zip(idx, per)]
        pos = int(np.ravel_multi_index([i % p for i, p in zip(idx, per)], per)) if per else 0
        return self.separator.join(("c", *map(str, sidx))), pos

    def shards_of(self, first: Sequence[int], counts: Sequence[int]) -> list[tuple[int, ...]]:
        """The shard indices that hold the inner chunks ``first .. first + counts``."""
        if self.shard is None:
            return [tuple(f + o for f, o in zip(first, off)) for off in np.ndindex(*counts)]
        per = self.per_shard
        ranges = [range(f // p, (f + c - 1) // p + 1) for f, c, p in zip(first, counts, per)]
        return list(itertools.product(*ranges))

    @property
    def index_bytes(self) -> int:
        return math.prod(self.per_shard) * 16 + 4


def layout_of(meta: Mapping[str, Any]) -> Layout | None:
    """The layout of an array whose ``zarr.json`` describes what ucp writes (regular grid,
    default ``c.i.j`` or ``c/i/j`` keys, raw little-endian bytes + CRC32C, fill value 0; sharded as above or
    not); None for anything else (read through zarr)."""
    try:
        grid, keys = meta.get("chunk_grid") or {}, meta.get("chunk_key_encoding") or {}
        sep = (keys.get("configuration") or {}).get("separator", "/")
        if not (meta.get("zarr_format") == 3 and meta.get("node_type") == "array"
                and meta.get("data_type") in _PLAIN_TYPES and grid.get("name") == "regular"
                and keys.get("name") == "default"
                and sep in ("/", ".")
                and not meta.get("storage_transformers") and meta.get("fill_value") in (0, 0.0, False)):
            return None
        shape, outer = tuple(meta["shape"]), tuple(grid["configuration"]["chunk_shape"])
        codecs = _plain(meta.get("codecs"))
        if codecs in _CODECS:
            inner, shard = outer, None
        elif isinstance(codecs, list) and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed":
            conf = codecs[0].get("configuration") or {}
            if _plain(conf.get("codecs")) not in _CODECS or _plain(conf.get("index_codecs")) not in _CODECS \
                    or conf.get("index_location", "end") != "end":
                return None
            inner, shard = tuple(conf["chunk_shape"]), outer
            if len(inner) != len(shard) or any(type(c) is not int or c < 1 or s % c for s, c in zip(shard, inner)):
                return None
        else:
            return None
        if len(shape) != len(outer) or not all(type(n) is int and n >= 0 for n in shape) \
                or not all(type(c) is int and c >= 1 for c in outer):
            return None
        return Layout(shape, np.dtype(meta["data_type"]), inner, shard, sep)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _plain(codecs: Any) -> Any:
    if not isinstance(codecs, list) or not all(isinstance(c, dict) for c in codecs):
        return None
    return [{k: v for k, v in c.items() if k != "configuration" or v} for c in codecs]


def parse_index(tail: bytes | memoryview, n: int) -> np.ndarray | None:
    """A shard's index (``n`` rows of offset, nbytes) from its last ``16 n + 4`` bytes; None
    when its CRC32C does not match."""
    tail = memoryview(tail)
    if tail.nbytes != 16 * n + 4 or crc32c(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
        return None
    return np.frombuffer(tail[:-4], dtype="<u8").reshape(n, 2)


class ChunkReader:
    """Reads single chunks of ucp-layout arrays straight from their files (byte ranges of a
    shard), each checked against its CRC32C; shard indexes are read once. Thread-safe: on local
    disk each thread reads into its own reused buffer (fresh buffers cost more in page faults
    than the read itself), so a returned chunk is valid until that thread's next read."""

    def __init__(self, storage: Any, url: str) -> None:
        self.storage, self.url = storage, url
        self._tls = threading.local()
        self._lock = threading.Lock()
        self._indexes: dict[str, np.ndarray] = {}

    def chunk(self, path: str, layout: Layout, idx: Sequence[int]) -> np.ndarray:
        """Inner chunk ``idx`` of the array at ``path``, cut to the array's edge (stored dtype)."""
        from ucp.core._errors import ChecksumError, CorruptCheckpointError

        rel, pos = layout.locate(idx)
        key = f"{path}/{rel}"
        valid = tuple(slice(0, min(c, s - i * c)) for i, c, s in zip(idx, layout.chunks, layout.shape))
        n = math.prod(layout.chunks) * layout.dtype.itemsize
        try:
            if layout.shard is None:
                raw = self._raw(key, n + 4, None)
            else:
                off, nb = self.index(key, layout)[pos].tolist()
                if nb != n + 4:
                    got = "no bytes" if nb == EMPTY else f"{nb} bytes"
                    raise CorruptCheckpointError(f"{self.url}/{key}: the shard index gives chunk {list(idx)} "
                                                 f"{got}, a chunk of this array has {n + 4}; the file is "
                                                 "damaged, convert the checkpoint again")
                raw = self._raw(key, n + 4, off)
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{self.url}/{key}: chunk file missing; the universal "
                                         "checkpoint lost data, convert it again") from e
        if raw.nbytes != n + 4:
            raise CorruptCheckpointError(f"{self.url}/{key}: {raw.nbytes} bytes where a chunk of this "
                                         f"array has {n + 4}; the file is damaged, convert the checkpoint again")
        if crc32c(raw[:n]) != int.from_bytes(raw[n:], "little"):
            raise ChecksumError(f"{self.url}/{key}: CRC32C does not match (a chunk in the file is "
                                "corrupt); convert the checkpoint again")
        return np.frombuffer(raw[:n], dtype=layout.dtype.newbyteorder("<")).reshape(layout.chunks)[valid]

    def read(self, path: str, layout: Layout, region: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
        """``region`` (``(start, stop)`` per dim; None: all) of an array, as a new array."""
        region = [(0, s) for s in layout.shape] if region is None else list(region)
        out = np.empty([hi - lo for lo, hi in region], dtype=layout.dtype)
        if out.size == 0:
            return out
        ranges = [range(lo // c, -(-hi // c)) for (lo, hi), c in zip(region, layout.chunks)]
        for idx in itertools.product(*ranges):
            block = self.chunk(path, layout, idx)
            box = [(max(lo, i * c), min(hi, i * c + b)) for (lo, hi), i, c, b in
                   zip(region, idx, layout.chunks, block.shape)]
            out[tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(box, region))] = \
                block[tuple(slice(a - i * c, b - i * c) for (a, b), i, c in zip(box, idx, layout.chunks))]
        return out

    def index(self, key: str, layout: Layout) -> np.ndarray:
        """A shard file's index (offset, nbytes per inner chunk), read once and checked."""
        from ucp.core._errors import ChecksumError, CorruptCheckpointError

        with self._lock:
            index = self._indexes.get(key)
        if index is not None:
            return index
        nidx = layout.index_bytes
        size = self.storage.size(key)
        if size < nidx:
            raise CorruptCheckpointError(f"{self.url}/{key}: {size} bytes, shorter than its index "
                                         f"({nidx} bytes); the file is damaged, convert the checkpoint again")
        index = parse_index(self.storage.read_range(key, size - nidx, size), math.prod(layout.per_shard))
        if index is None:
            raise ChecksumError(f"{self.url}/{key}: the shard index's CRC32C does not match (the file "
                                "is corrupt); convert the checkpoint again")
        with self._lock:
            return self._indexes.setdefault(key, index)

    def _raw(self, key: str, size: int, offset: int | None) -> memoryview:
        """A chunk file's bytes, or ``size`` bytes from ``offset`` of a shard. A whole file is
        read one byte further, so a longer file shows."""
        storage = self.storage
        if not storage.is_local:
            if offset is not None:
                return memoryview(storage.read_range(key, offset, offset + size))
            return memoryview(storage.read(key, max_bytes=size))
        want = size + 1 if offset is None else size
        buf = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < want:
            buf = self._tls.buf = bytearray(max(want, 1 << 20))
        view, target = memoryview(buf), storage.path(key)

        def fn() -> int:
            with open_regular(target, buffering=0) as f:
                if offset is not None:
                    f.seek(offset)
                got = 0
                while got < want:
                    k = f.readinto(view[got:want])
                    if not k:
                        break
                    got += k
                return got
        got = retry_call(fn, policy=storage.retry, what=f"reading {self.url}/{key}")
        count_read(got)
        return view[:got]
