"""Writing large local files around the page cache: ``O_DIRECT`` in large aligned blocks.

A buffered write copies every byte into the page cache, and the kernel later writes the dirty
pages back; for gigabytes written once and not read again soon (a converted or resharded
checkpoint) that copy, the page bookkeeping and the write-back cost several times the system
CPU of the device transfer itself (measured on a 2-vCPU VM: 3 GiB written and fsync'd took 5.5-10.7 s
of system CPU buffered, 0.15-0.3 s with ``O_DIRECT``; see docs/benchmarks.md). Here the caller's
buffers are gathered into a few reused, page-aligned blocks (one copy, in user space, which
replaces the kernel's copy into the page cache) and each full block is written by one background
thread while the caller fills the next, so encoding and the device overlap. The last block is
padded to the alignment and the file then cut to its size.

Where the filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems) the same code writes
through the page cache: the bytes written are the same either way. The data of a direct write is
on the device when :func:`write_blocks` returns, but not necessarily flushed from its cache, nor
are the file's size and directory entry journaled: callers make it durable as for any write
(``fsync``, or one ``syncfs`` for many files, :class:`ucp.storage.Flusher`).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import mmap
import os
import threading
from collections.abc import Iterable
from typing import BinaryIO

import crc32c as _crc32c

try:
    import fcntl
except ImportError:  # Windows: no O_DIRECT either
    fcntl = None  # type: ignore[assignment]

__all__ = ["ALIGN", "BLOCK", "DIRECT_FLAG", "direct_opener", "write_blocks"]

#: Alignment of a direct write's address, length and file offset (the page size covers every
#: logical block size in use).
ALIGN = mmap.PAGESIZE
#: Bytes per write: large enough that per-call costs vanish, small enough to keep a few in flight.
BLOCK = 8 << 20
#: Blocks per writing thread: one being filled while the others are written.
NBUF = 3
DIRECT_FLAG = getattr(os, "O_DIRECT", 0)

_tls = threading.local()
_pool_lock = threading.Lock()
_pool: cf.ThreadPoolExecutor | None = None


def _writer() -> cf.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = cf.ThreadPoolExecutor(1, thread_name_prefix="ucp-direct")
        return _pool


def _blocks() -> list[mmap.mmap]:
    """This thread's reused page-aligned blocks (fresh memory per file would cost more in page
    faults than the write)."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = [mmap.mmap(-1, BLOCK) for _ in range(NBUF)]
    return bufs


def direct_opener(path: str, flags: int) -> int:
    """An ``opener`` for :func:`open`: ``O_DIRECT`` added where the filesystem takes it."""
    if DIRECT_FLAG:
        try:
            return os.open(path, flags | DIRECT_FLAG, 0o666)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT (tmpfs)
                raise
    return os.open(path, flags, 0o666)


def _write_all(f: BinaryIO, view: memoryview) -> None:
    """Writes all of ``view`` at ``f``'s position; a filesystem that takes the ``O_DIRECT`` open
    but not the write (EINVAL) gets it, and the rest of the file, through the page cache."""
    fd = f.fileno()
    while view:
        try:
            n = f.write(view)
        except OSError as e:
            if e.errno != errno.EINVAL or fcntl is None or not fcntl.fcntl(fd, fcntl.F_GETFL) & DIRECT_FLAG:
                raise
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~DIRECT_FLAG)
            continue
        if not n:
            raise OSError(errno.EIO, "short write", getattr(f, "name", str(fd)))
        view = view[n:]


def write_blocks(f: BinaryIO, chunks: Iterable[bytes | bytearray | memoryview], *, crc: bool) -> tuple[int, int]:
    """Writes ``chunks`` in order from the start of the new, empty, unbuffered file ``f``
    (opened with ``O_DIRECT`` or not: :func:`direct_opener`); returns (bytes written, their
    CRC32C; 0 without ``crc``). Writes go through ``f.write``, in order, one at a time.

    Full blocks are written on a background thread while the next is filled; at most
    ``NBUF - 1`` writes are in flight, and none when this returns (or raises).
    """
    bufs, pool = _blocks(), _writer()
    views = [memoryview(b) for b in bufs]
    inflight: list[cf.Future[None]] = []
    cur, fill, offset, value = 0, 0, 0, 0
    try:
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if crc:
                value = _crc32c.crc32c(view, value)
            while view:
                n = min(len(view), BLOCK - fill)
                views[cur][fill:fill + n] = view[:n]
                fill, view = fill + n, view[n:]
                if fill == BLOCK:
                    inflight.append(pool.submit(_write_all, f, views[cur]))
                    offset, fill, cur = offset + BLOCK, 0, (cur + 1) % NBUF
                    if len(inflight) == NBUF - 1:  # the next block to fill may still be in flight
                        inflight.pop(0).result()
            del chunk, view  # copied: let the caller free it before it makes the next
        for fut in inflight:
            fut.result()
        inflight = []
        if fill:
            padded = -(-fill // ALIGN) * ALIGN
            views[cur][fill:padded] = bytes(padded - fill)
            _write_all(f, views[cur][:padded])
            if padded != fill:
                os.ftruncate(f.fileno(), offset + fill)
        return offset + fill, value
    finally:
        for fut in inflight:  # an error: let every write end before the blocks are reused
            try:
                fut.result()
            except OSError:
                pass
