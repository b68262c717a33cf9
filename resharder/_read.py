"""Executing a load plan: reads grouped by chunk, run in parallel, copied into local tensors.

For each array the plan touches, the chunks overlapping any of its boxes are gathered into
rectangular blocks of chunks (one task each, at most ``max_block_bytes``), so a chunk is fetched
once however many copies need it. Tasks run on a thread pool; a block is read chunk by chunk
(:meth:`~._source.ArraySource.iter_region`) and each chunk is copied into its destinations and
dropped, so memory is the plan's tensors plus a chunk per thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import math
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ucp.core._errors import CorruptCheckpointError
from ucp.storage import read_counter

from ._plan import Copy, LocalTensor, Path, RankPlan, Read
from ._source import ArrayInfo, ArraySource, read_many
from ._zero import Region

__all__ = ["ReadStats", "LoadedRank", "read_plan", "chunk_blocks", "estimate_reads", "runs"]

#: Largest block of chunks one read fetches (bounds the memory of reads in flight).
MAX_BLOCK_BYTES = 16 * 2**20
#: Threads reading from a source that reads regions partially (each holds one piece at a time).
PARTIAL_THREADS = 4
#: Bytes each stored chunk carries besides its data (zarr's crc32c codec).
CHUNK_OVERHEAD = 4


@dataclasses.dataclass(frozen=True)
class ReadStats:
    """What loading cost: bytes fetched from storage vs bytes the plan needed.

    ``amplification`` is ``bytes_read / bytes_needed`` (1.0 when nothing was needed). For a
    source converted on the fly, ``bytes_read`` counts each consolidated state read in full.
    """

    bytes_read: int = 0
    bytes_needed: int = 0
    chunks_read: int = 0
    reads: int = 0
    seconds: float = 0.0

    @property
    def amplification(self) -> float:
        return self.bytes_read / self.bytes_needed if self.bytes_needed else 1.0

    def __add__(self, other: ReadStats) -> ReadStats:
        return ReadStats(self.bytes_read + other.bytes_read, self.bytes_needed + other.bytes_needed,
                         self.chunks_read + other.chunks_read, self.reads + other.reads,
                         self.seconds + other.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "amplification": self.amplification}


@dataclasses.dataclass(frozen=True)
class LoadedRank:
    """A plan's tensors, read (``tensors`` maps each :class:`LocalTensor` path to its tensor)."""

    plan: RankPlan
    tensors: dict[Path, torch.Tensor]
    stats: ReadStats


# -- chunk grouping (pure) ----------------------------------------------------------------------
def runs(values: Iterable[int]) -> list[tuple[int, int]]:
    """Integers (any order) as sorted ``[start, stop)`` runs of consecutive values."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and out[-1][1] == v:
            out[-1] = (out[-1][0], v + 1)
        else:
            out.append((v, v + 1))
    return out


def _chunk_boxes(index_boxes: set[tuple[int, ...]]) -> list[tuple[tuple[int, int], ...]]:
    """Disjoint boxes of chunk indices covering the set: runs along dim 1, merged along dim 0."""
    ndim = len(next(iter(index_boxes)))
    if ndim == 0:
        return [()]
    if ndim == 1:
        return [(r,) for r in runs(i[0] for i in index_boxes)]
    rows: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for idx in index_boxes:
        rows.setdefault((idx[0], idx[2:]), []).append(idx[1])
    cols: dict[tuple[tuple[int, int], tuple[int, ...]], list[int]] = {}
    for (i0, tail), js in rows.items():
        for run in runs(js):
            cols.setdefault((run, tail), []).append(i0)
    out = []
    for (run, tail), i0s in cols.items():
        for r0 in runs(i0s):
            out.append((r0, run) + tuple((t, t + 1) for t in tail))
    return sorted(out)


def chunk_blocks(boxes: Iterable[Region], shape: Sequence[int], chunks: Sequence[int],
                 itemsize: int, max_bytes: int = MAX_BLOCK_BYTES) -> list[tuple[Region, int]]:
    """The blocks of whole chunks to read for ``boxes`` of an array: ``(region, chunk count)``.

    Every chunk overlapping a box is in exactly one block; a block is a box of chunks clipped to
    the array, holding at most ``max_bytes`` (one chunk at least).
    """
    touched: set[tuple[int, ...]] = set()
    for box in boxes:
        if any(a >= b for a, b in box):
            continue
        touched.update(itertools.product(*(range(a // c, (b - 1) // c + 1)
                                            for (a, b), c in zip(box, chunks))))
    if not touched:
        return []
    chunk_bytes = math.prod(chunks) * itemsize
    out = []
    for ibox in _chunk_boxes(touched):
        for sub in _split(ibox, chunk_bytes, max_bytes):
            region = tuple((a * c, min(b * c, s)) for (a, b), c, s in zip(sub, chunks, shape))
            out.append((region, math.prod(b - a for a, b in sub)))
    return out


def _split(ibox: tuple[tuple[int, int], ...], chunk_bytes: int, max_bytes: int
           ) -> list[tuple[tuple[int, int], ...]]:
    """A box of chunk indices cut into boxes of at most ``max_bytes`` (one chunk at least):
    along dim 1 when one row of chunks is already too large, then along dim 0."""
    if not ibox:
        return [()]
    if len(ibox) == 1:
        (r0, r1), step = ibox[0], max(1, max_bytes // chunk_bytes)
        return [((r, min(r1, r + step)),) for r in range(r0, r1, step)]
    cell = math.prod(b - a for a, b in ibox[2:]) * chunk_bytes  # one (dim 0, dim 1) position
    (c0, c1), (r0, r1) = ibox[1], ibox[0]
    cstep, out = max(1, max_bytes // cell), []
    for c in range(c0, c1, cstep):
        col = (c, min(c1, c + cstep))
        rstep = max(1, max_bytes // ((col[1] - col[0]) * cell))
        out += [((r, min(r1, r + rstep)), col) + ibox[2:] for r in range(r0, r1, rstep)]
    return out


def estimate_reads(plan: RankPlan, arrays: Callable[[str, str | None], ArrayInfo]) -> ReadStats:
    """The bytes :func:`read_plan` would read and need for ``plan``, without reading.

    ``arrays(name, state)`` gives each array's chunking (e.g. from ``chunk_shape``).
    """
    bytes_read = needed = nchunks = nreads = 0
    for (name, state), reads in _by_array(plan.reads).items():
        info = arrays(name, state)
        r, n, c, k = _cost(reads, info)
        bytes_read, needed, nchunks, nreads = bytes_read + r, needed + n, nchunks + c, nreads + k
    return ReadStats(bytes_read, needed, nchunks, nreads)


def _cost(reads: Sequence[Read], info: ArrayInfo) -> tuple[int, int, int, int]:
    """(bytes read, bytes needed, chunks, reads) of one array, as :func:`read_plan` counts them."""
    if info.chunks is None:  # read whole, once
        size = math.prod(info.shape) * info.itemsize if info.shape is not None else 0
        needed = size if any(r.whole for r in reads) else sum(
            math.prod(b - a for a, b in c.src) * info.itemsize for r in reads for c in r.copies)
        return size, needed, 0, 1
    reads = [_as_copies(r, info) for r in reads]
    needed = sum(math.prod(b - a for a, b in c.src) for r in reads for c in r.copies) * info.itemsize
    blocks = chunk_blocks((c.src for r in reads for c in r.copies), info.shape, info.chunks,
                          info.itemsize)
    nchunks = sum(n for _, n in blocks)
    return nchunks * (math.prod(info.chunks) * info.itemsize + CHUNK_OVERHEAD), needed, nchunks, len(blocks)


def _by_array(reads: Iterable[Read]) -> dict[tuple[str, str | None], list[Read]]:
    out: dict[tuple[str, str | None], list[Read]] = {}
    for r in reads:
        out.setdefault((r.name, r.state), []).append(r)
    return out


# -- execution ----------------------------------------------------------------------------------
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NP_BITS = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}


def _bits(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy integer array (bf16 and bool included). Copies run in
    numpy: single-threaded and GIL-free, where torch's own copies would fight the reader threads
    for its intra-op thread pool."""
    return t.view(_BITS[t.element_size()]).numpy()


class _Dest:
    """A local tensor, allocated (zeros) on first write; writes to it may come from any thread."""

    def __init__(self, lt: LocalTensor, out: torch.Tensor | None = None) -> None:
        self.lt, self.shape, self.tensor, self.flat = lt, lt.shape, None, None
        self.lock = threading.Lock()
        if out is not None:  # a caller's tensor, written in place
            self.tensor, self.shape, self.flat = out, tuple(out.shape), _bits(out).reshape(-1)

    def get(self, dtype: torch.dtype, what: str) -> np.ndarray:
        """The tensor's flat memory (numpy bits), allocated as ``dtype`` unless the plan fixed it."""
        with self.lock:
            if self.tensor is None:  # numpy's zeros are lazily zeroed pages (torch.zeros fills)
                want = self.lt.dtype or dtype
                self.flat = np.zeros(math.prod(self.shape or ()), dtype=_NP_BITS[want.itemsize])
                self.tensor = torch.from_numpy(self.flat).view(want).view(self.shape or ())
        if self.tensor.dtype != dtype:
            raise CorruptCheckpointError(
                f"{what} is stored as {dtype}, but the tensor it goes to "
                f"({'/'.join(map(str, self.lt.path))}) is {self.tensor.dtype}: a ZeRO group mixes "
                "dtypes, or a live tensor has another dtype than the checkpoint")
        return self.flat


def _what(read: Read) -> str:
    return f"{read.name!r} ({read.state or 'buffer'})"


def _apply(block: torch.Tensor, region: Region, reads: Sequence[Read], dests: dict[Path, _Dest]) -> None:
    """Copies the part of every read that lies in ``region`` (``block`` holds that region)."""
    data = _bits(block)
    for r in reads:
        flat = dests[r.path].get(block.dtype, _what(r))
        for c in r.copies:
            inter = tuple((max(a, x), min(b, y)) for (a, b), (x, y) in zip(c.src, region))
            if any(lo >= hi for lo, hi in inter):
                continue
            src = data[tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(inter, region))]
            perm = r.perm or tuple(range(len(inter)))
            if perm != tuple(range(len(perm))):
                src = src.transpose(perm)
            view = flat[c.offset:c.offset + math.prod(c.view)].reshape(c.view)
            dst = []
            for (d0, _), p in zip(c.dst, perm):
                start = d0 + inter[p][0] - c.src[p][0]
                dst.append(slice(start, start + inter[p][1] - inter[p][0]))
            view[tuple(dst)] = src


def _as_copies(read: Read, info: ArrayInfo) -> Read:
    """A ``whole`` read of an array of known shape, as one ordinary copy of all of it."""
    if not read.whole:
        return read
    full = tuple((0, s) for s in info.shape)
    return dataclasses.replace(read, copies=(Copy(full, 0, tuple(info.shape), full),),
                               perm=tuple(range(len(full))), whole=False)


def _whole_as_copies(reads: Sequence[Read], info: ArrayInfo, dests: dict[Path, _Dest]) -> list[Read]:
    """``reads`` with every ``whole`` one as a copy of the array (its destination takes the
    array's shape)."""
    out = []
    for r in reads:
        if r.whole:
            dests[r.path].shape = info.shape
        out.append(_as_copies(r, info))
    return out


def _tasks(plan: RankPlan, source: ArraySource, dests: dict[Path, _Dest], max_block_bytes: int
           ) -> tuple[list[Callable[[], tuple[int, int, int]]], int]:
    """One task per block of chunks (or per whole array); returns them and the bytes needed."""
    groups = _by_array(plan.reads)
    infos = dict(zip(groups, read_many(source, list(groups))))
    tasks, needed = [], 0
    for key, reads in groups.items():
        info = infos[key]
        if info.chunks is None and source.partial and info.shape is not None:
            reads = _whole_as_copies(reads, info, dests)
            needed += sum(math.prod(b - a for a, b in c.src) for r in reads for c in r.copies) * info.itemsize
            for box in dict.fromkeys(c.src for r in reads for c in r.copies):
                tasks.append(lambda key=key, box=box, reads=reads: _partial(source, key, box, reads, dests))
            continue
        if info.chunks is None:
            tasks.append(lambda key=key, reads=reads: _whole(source, key, reads, dests))
            continue
        reads = _whole_as_copies(reads, info, dests)
        needed += sum(math.prod(b - a for a, b in c.src) for r in reads for c in r.copies) * info.itemsize
        per = math.prod(info.chunks) * info.itemsize + CHUNK_OVERHEAD
        for region, n in chunk_blocks((c.src for r in reads for c in r.copies), info.shape,
                                      info.chunks, info.itemsize, max_block_bytes):
            def task(key=key, region=region, n=n, reads=reads, per=per) -> tuple[int, int, int]:
                for sub, data in source.iter_region(key[0], key[1], region):
                    _apply(data, sub, reads, dests)
                return n * per, 0, n
            tasks.append(task)
    return tasks, needed


def _partial(source: ArraySource, key: tuple[str, str | None], box: Region, reads: Sequence[Read],
             dests: dict[Path, _Dest]) -> tuple[int, int, int]:
    """One box of an unchunked array from a source that reads only the bytes of a region."""
    for sub, data in source.iter_region(key[0], key[1], box):
        _apply(data, sub, reads, dests)
    return 0, 0, 0  # bytes read: what storage counted over the whole plan (see read_plan)


def _whole(source: ArraySource, key: tuple[str, str | None], reads: Sequence[Read],
           dests: dict[Path, _Dest]) -> tuple[int, int, int]:
    """A source that reads whole arrays only: read once, copy every read's boxes out of it."""
    data = source.read(key[0], key[1], None)
    full = tuple((0, s) for s in data.shape)
    reads = [_as_copies(r, ArrayInfo(tuple(data.shape), data.dtype, None, 0)) for r in reads]
    for r in reads:
        if dests[r.path].shape is None:
            dests[r.path].shape = tuple(data.shape)
    _apply(data, full, reads, dests)
    item = data.element_size()
    needed = sum(math.prod(b - a for a, b in c.src) for r in reads for c in r.copies) * item
    return data.numel() * item, needed, 0


def read_plan(plan: RankPlan, source: ArraySource, *, workers: int = 8,
              max_block_bytes: int = MAX_BLOCK_BYTES,
              out: Mapping[Path, torch.Tensor] | None = None) -> LoadedRank:
    """Reads everything ``plan`` needs from ``source``; each rank calls it for its own plan.

    No collective: any process may run any rank's plan. Memory: the plan's tensors plus up to
    ``workers`` blocks of at most ``max_block_bytes``.

    Args:
        plan: the plan.
        source: where to read.
        workers: reads in flight.
        max_block_bytes: the most one read fetches.
        out: tensors to fill in place instead of allocating (contiguous CPU tensors of the
            local shape and dtype, by path); where no copy writes they keep their values.

    Raises:
        CorruptCheckpointError / ChecksumError: a damaged array (names it).
    """
    start = time.perf_counter()
    out = out or {}
    dests = {lt.path: _Dest(lt, out.get(lt.path)) for lt in plan.tensors}
    before = read_counter()
    tasks, needed = _tasks(plan, source, dests, max_block_bytes)
    bytes_read = chunks = 0
    threads = max(1, min(workers, len(tasks))) if source.concurrent else 1
    if source.partial:  # each thread holds a piece of a fragment: bound the memory in flight
        threads = min(threads, PARTIAL_THREADS)
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="ucp-reshard") as pool:
        futures = [pool.submit(t) for t in tasks]
        try:
            for fut in cf.as_completed(futures):
                r, n, c = fut.result()
                bytes_read, needed, chunks = bytes_read + r, needed + n, chunks + c
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    if source.partial:  # counted by storage: every byte the source read, metadata included
        bytes_read += (read_counter() - before).bytes
    tensors = {path: _finish(d, source) for path, d in dests.items()}
    stats = ReadStats(bytes_read, needed, chunks, len(tasks), time.perf_counter() - start)
    return LoadedRank(plan, tensors, stats)


def _finish(dest: _Dest, source: ArraySource) -> torch.Tensor:
    """The tensor of ``dest``; one no read touched (all padding) takes its dtype from ``like``."""
    if dest.tensor is not None:
        return dest.tensor
    dtype = dest.lt.dtype
    if dtype is None and dest.lt.like is not None:
        dtype = source.array(*dest.lt.like).dtype or source.read(*dest.lt.like, None).dtype
    return torch.zeros(dest.shape or (), dtype=dtype or torch.float32)
