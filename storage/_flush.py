"""Making many written files durable without waiting for each: a background flusher.

A writer that produces gigabytes in many files and fsyncs none of them leaves the whole
write-back to the end (the kernel starts it late), so the last ``sync`` costs about as much as
the writing did; an ``fsync`` per file instead waits for a journal commit per file. Here each
finished data file's write-back is *started* on a background thread (Linux
``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which does not wait; elsewhere ``fdatasync``), so the
disk stays busy while the writer encodes the next one, and :meth:`Flusher.finish` makes it all
durable at once: one ``syncfs`` of the filesystem (file data, sizes and directory entries in one
journal commit; ``sync`` where there is no ``syncfs``). Object stores need none of this (a
completed put is durable): there every call is a no-op.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import ctypes.util
import os
import threading

from ucp.core._errors import StorageError

__all__ = ["Flusher"]

_SYNC_FILE_RANGE_WRITE = 2


def _libc() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    return lib if hasattr(lib, "syncfs") and hasattr(lib, "sync_file_range") else None


_LIBC = _libc()
if _LIBC is not None:
    _LIBC.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _LIBC.syncfs.argtypes = [ctypes.c_int]


class Flusher:
    """Starts the write-back of files written below a local root on one background thread,
    and makes everything written there durable in :meth:`finish`.

    Used by one writing process; :meth:`add` may be called from any of its threads.

    Example:
        >>> flusher = Flusher(storage)
        >>> storage.write("a/data", blob, fsync=False); flusher.add("a/data")
        >>> flusher.finish()   # "a/data" and its directory entries are on disk
    """

    def __init__(self, storage: object) -> None:
        self.storage = storage
        self._local = bool(getattr(storage, "is_local", False))
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, cf.Future[None]]] = []
        self._lock = threading.Lock()

    def add(self, rel: str) -> None:
        """Starts the write-back of the complete file ``rel``."""
        if not self._local:
            return
        path = self.storage.path(rel)  # type: ignore[attr-defined]
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="ucp-flush")
            self._pending.append((rel, self._pool.submit(_start_writeback, path)))
            while self._pending and self._pending[0][1].done():  # keep the list short
                self._result(*self._pending.pop(0))

    def _result(self, rel: str, fut: cf.Future[None]) -> None:
        try:
            fut.result()
        except OSError as e:
            raise StorageError(f"{self.storage.url}/{rel}: could not write to disk ({e}); "  # type: ignore[attr-defined]
                               "check the disk (full, or failing) and write again") from e

    def finish(self) -> None:
        """Waits for the started write-backs, then makes the root's filesystem durable (file
        data, sizes and every directory entry); a no-op on object stores.

        Raises:
            StorageError: writing back a file, or the final sync, failed.
        """
        if not self._local:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        for rel, fut in pending:
            self._result(rel, fut)
        root = self.storage.root  # type: ignore[attr-defined]
        try:
            _sync_filesystem(root)
        except OSError as e:
            raise StorageError(f"{self.storage.url}: could not flush to disk ({e}); check the "  # type: ignore[attr-defined]
                               "disk (full, or failing) and write again") from e

    def close(self) -> None:
        """Stops the background thread (after the write-backs already started)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _start_writeback(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _LIBC is None:
            os.fdatasync(fd)
        elif _LIBC.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


def _sync_filesystem(path: str) -> None:
    """``syncfs`` of the filesystem holding ``path`` (``sync`` where there is none)."""
    if _LIBC is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _LIBC.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)
