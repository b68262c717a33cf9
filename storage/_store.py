"""A checkpoint root on any fsspec filesystem: atomic writes, verified reads, parallel I/O.

Local paths are written with plain ``os`` calls (``*.partial`` file, ``fsync``, ``os.replace``,
directory ``fsync``) because that is the fastest durable path and gives a true atomic rename.
Object stores get a single put per object, which is atomic by the store's own guarantee; the
commit of a whole checkpoint is the manifest, which callers write last.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import posixpath
import shutil
import stat
import uuid
from typing import Any, BinaryIO, Callable, Iterable, Mapping, Sequence, TypeVar

import crc32c as _crc32c
import fsspec

from ucp.core._errors import CheckpointExistsError, ChecksumError, CorruptCheckpointError, StorageError, \
    UnsafeInputError, UnsupportedProtocolError
from ucp.core._records import FileRecord

from ._direct import direct_opener, write_blocks
from ._retry import RetryPolicy, retry_call
from ._stats import count_read

__all__ = ["Storage", "checksum", "verify", "open_regular", "PACKAGE_FOR_PROTOCOL"]

T = TypeVar("T")
R = TypeVar("R")
Buffer = bytes | bytearray | memoryview

#: The pip package that provides each well-known fsspec protocol.
PACKAGE_FOR_PROTOCOL = {"s3": "s3fs (pip install 'ucp[s3]')", "s3a": "s3fs (pip install 'ucp[s3]')",
                        "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                        "abfss": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko",
                        "ssh": "paramiko", "hdfs": "pyarrow"}
_PARTIAL = ".partial-"


def checksum(chunks: Iterable[Buffer], value: int = 0) -> tuple[int, int]:
    """CRC32C and total size of ``chunks``."""
    size = 0
    for chunk in chunks:
        value = _crc32c.crc32c(chunk, value)
        size += memoryview(chunk).nbytes
    return value, size


def _as_chunks(data: Buffer | Sequence[Buffer]) -> Sequence[Buffer]:
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else data


def _check_rel(rel: str) -> str:
    """Rejects a relative path that could leave the checkpoint root."""
    if not isinstance(rel, str) or "\x00" in rel or rel.startswith(("/", "\\")) or ":" in rel \
            or any(part in ("..", "") for part in rel.split("/")) or "\\" in rel or len(rel) > 4096:
        raise UnsafeInputError(f"refusing path {rel!r}: checkpoint paths must be relative, "
                               "without '..', empty parts, backslashes, ':' or NUL")
    return rel


class Storage:
    """A checkpoint root directory on local disk or any fsspec URL.

    Every method may be called from any rank and any thread; none is collective.

    Args:
        url: a local path or an fsspec URL (``s3://bucket/prefix``, ``memory://x``).
        storage_options: passed to the fsspec filesystem (credentials, endpoint).
        retry: retry policy for transient errors.
        workers: threads used by :meth:`map`.

    Raises:
        UnsupportedProtocolError: the URL's protocol needs a package that is not installed.

    Example:
        >>> s = Storage("memory://ucp-doc")
        >>> s.write("a/b.bin", b"xy").size
        2
        >>> s.read("a/b.bin")
        b'xy'
    """

    def __init__(self, url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                 retry: RetryPolicy = RetryPolicy(), workers: int = 8) -> None:
        url = os.fspath(url)
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        def open_fs() -> tuple[Any, Exception | None]:
            try:
                return fsspec.core.url_to_fs(url, **dict(storage_options or {})), None
            except (ImportError, ValueError) as e:  # not retried: reported below
                return None, e

        # some filesystems (ftp, sftp) connect here already: retried, then a StorageError
        opened, error = retry_call(open_fs, policy=retry, what=f"opening {url}")
        if isinstance(error, ImportError):
            pkg = PACKAGE_FOR_PROTOCOL.get(protocol, f"the fsspec implementation of {protocol!r}")
            raise UnsupportedProtocolError(f"cannot open {url!r}: protocol {protocol!r} needs {pkg}, "
                                           f"which is not installed ({error})") from error
        if error is not None:
            raise UnsupportedProtocolError(f"cannot open {url!r}: fsspec knows no protocol "
                                           f"{protocol!r} ({error})") from error
        fs, root = opened
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs = fs
        self.is_local = "file" in _protocols(fs)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        self.retry = retry
        self.workers = max(1, workers)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    # -- paths ---------------------------------------------------------------------------------
    def path(self, rel: str = "") -> str:
        """The filesystem path of ``rel`` below the root (validated; '' is the root)."""
        if rel == "":
            return self.root
        _check_rel(rel)
        return os.path.join(self.root, *rel.split("/")) if self.is_local else f"{self.root}/{rel}"

    def child(self, rel: str) -> Storage:
        """A Storage rooted at ``rel`` below this root, sharing the filesystem object."""
        sub = object.__new__(Storage)
        sub.__dict__.update(self.__dict__)
        sub.root = self.path(rel)
        sub.url = posixpath.join(self.url, rel)
        return sub

    # -- writes --------------------------------------------------------------------------------
    def write(self, rel: str, data: Buffer | Sequence[Buffer], *, fsync: bool = True,
              atomic: bool = True, crc: bool = True, exclusive: bool = False,
              direct: bool = False) -> FileRecord:
        """Writes ``data`` (bytes, or a sequence of buffers written in order) atomically.

        Readers see either the previous object or the complete new one, never a prefix. With
        ``atomic=False`` a local file is written without a temporary and rename: for pieces of a
        larger whole whose commit record is written last anyway. Either way an existing file is
        replaced by a new one, never rewritten in place, so a hard-linked snapshot of the root
        (``cp -al``, ``rsync --link-dest``) keeps its bytes.

        With ``exclusive=True`` the write succeeds only if nothing exists at ``rel`` yet
        (create-if-absent: a hard link on local disk, a conditional put on S3; other object
        stores check first, which is not atomic: callers hold a lease there).

        With ``direct=True`` a local file is written around the page cache (``O_DIRECT``, in
        large aligned blocks written while the next is filled, :mod:`ucp.storage._direct`;
        through the page cache where the filesystem refuses it): for large files written once.

        Returns:
            The file's size and CRC32C (0 with ``crc=False``: for data that carries its own).

        Raises:
            CheckpointExistsError: ``exclusive`` and ``rel`` already exists.
        """
        chunks = _as_chunks(data)
        target = self.path(rel)
        if self.is_local:
            fn = lambda: self._write_local(target, chunks, fsync=fsync, atomic=atomic or exclusive,  # noqa: E731
                                           crc=crc, exclusive=exclusive, direct=direct)
        else:
            fn = lambda: self._write_remote(target, chunks, crc=crc, exclusive=exclusive)  # noqa: E731
        try:
            return retry_call(fn, policy=self.retry, what=f"writing {self.url}/{rel}")
        except CheckpointExistsError as e:
            raise CheckpointExistsError(f"{self.url}/{rel} already exists (another writer "
                                        "created it first)") from e.__cause__

    def _write_local(self, target: str, chunks: Sequence[Buffer], *, fsync: bool, atomic: bool,
                     crc: bool = True, exclusive: bool = False, direct: bool = False) -> FileRecord:
        directory = os.path.dirname(target)
        tmp = f"{target}{_PARTIAL}{uuid.uuid4().hex[:12]}" if atomic else target
        if not atomic:  # a new inode: never rewrite the bytes a hard link elsewhere shares
            _remove_quietly(target)
        value, size = 0, 0
        try:
            with _create(tmp, directory, replace=not atomic, direct=direct) as f:
                if direct:
                    size, value = write_blocks(f, chunks, crc=crc)
                    chunks = ()
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    if crc:
                        value = _crc32c.crc32c(view, value)
                    while view:  # raw writes may be short
                        n = f.write(view)
                        view = view[n:]
                        size += n
                if fsync:
                    os.fsync(f.fileno())
            if exclusive:
                _link_exclusive(tmp, target)
            elif atomic:
                os.replace(tmp, target)
        except BaseException:
            _remove_quietly(tmp)
            raise
        if fsync:
            _fsync_dir(directory)
        return FileRecord(size=size, crc32c=value)

    def _write_remote(self, target: str, chunks: Sequence[Buffer], *, crc: bool = True,
                      exclusive: bool = False) -> FileRecord:
        payload = bytes(chunks[0]) if len(chunks) == 1 else b"".join(bytes(c) for c in chunks)
        try:  # mode="create": s3fs sends If-None-Match: * (atomic); fsspec's default checks first
            self.fs.pipe_file(target, payload, **({"mode": "create"} if exclusive else {}))
        except FileExistsError as e:
            raise CheckpointExistsError(target) from e
        return FileRecord(size=len(payload), crc32c=checksum([payload])[0] if crc else 0)

    # -- reads ---------------------------------------------------------------------------------
    def read(self, rel: str, *, record: FileRecord | None = None, mutable: bool = False,
             max_bytes: int | None = None) -> bytes | bytearray:
        """Reads a whole file; with ``record``, verifies its size and CRC32C.

        With ``mutable=True`` the result is a ``bytearray`` (tensors can then alias it). A file
        larger than ``max_bytes``, or (on local disk) of another size than ``record``, is refused
        before its bytes are read, so a hostile file cannot make the reader allocate its size.

        Raises:
            FileNotFoundError (a ucp CheckpointNotFoundError is raised by callers that know more).
            ChecksumError: the bytes differ from ``record``; the message names the file.
            CorruptCheckpointError: the file is larger than ``max_bytes``.
        """
        target, where = self.path(rel), f"{self.url}/{rel}"
        if self.is_local:
            def fn() -> bytes | bytearray:
                with open_regular(target, where=where) as f:
                    size = os.fstat(f.fileno()).st_size
                    _check_size(size, record=record, max_bytes=max_bytes, where=where)
                    if not mutable:
                        data = _read_bounded(f, size, max_bytes)
                        _check_size(len(data), record=None, max_bytes=max_bytes, where=where)
                        return data
                    buf = bytearray(size)
                    n = f.readinto(buf)
                    return buf if n == len(buf) else buf[:n]
        else:
            def fn() -> bytes | bytearray:
                if max_bytes is None:
                    data = self.fs.cat_file(target)
                else:  # one ranged GET: at most one byte more than allowed
                    data = self.fs.cat_file(target, start=0, end=max_bytes + 1)
                    _check_size(len(data), record=None, max_bytes=max_bytes, where=where)
                return bytearray(data) if mutable else data
        data = retry_call(fn, policy=self.retry, what=f"reading {where}")
        count_read(len(data))
        if record is not None:
            verify(data, record, where=where)
        return data

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of a file (no checksum: callers verify what they assemble)."""
        target = self.path(rel)
        if self.is_local:
            def fn() -> bytes:
                with open_regular(target, where=f"{self.url}/{rel}") as f:
                    f.seek(start)
                    return f.read(end - start)
        else:
            fn = lambda: self.fs.cat_file(target, start=start, end=end)  # noqa: E731
        data = retry_call(fn, policy=self.retry, what=f"reading {self.url}/{rel}[{start}:{end}]")
        count_read(len(data))
        return data

    def read_range_into(self, rel: str, start: int, out: memoryview) -> int:
        """Reads bytes from ``start`` of a file into ``out`` (as many as it holds, fewer at the
        end of the file) without an intermediate copy on local disk; returns how many were read."""
        target, n = self.path(rel), out.nbytes
        if self.is_local:
            def fn() -> int:
                with open(target, "rb", buffering=0) as f:
                    f.seek(start)
                    got = 0
                    while got < n:
                        k = f.readinto(out[got:])
                        if not k:
                            break
                        got += k
                    return got
        else:
            def fn() -> int:
                data = self.fs.cat_file(target, start=start, end=start + n)
                out[:len(data)] = data
                return len(data)
        got = retry_call(fn, policy=self.retry, what=f"reading {self.url}/{rel}[{start}:{start + n}]")
        count_read(got)
        return got

    # -- listing and deletion ------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        target = self.path(rel)
        if self.is_local:
            return os.path.exists(target)
        return retry_call(lambda: self.fs.exists(target), policy=self.retry,
                          what=f"checking {self.url}/{rel}")

    def is_link(self, rel: str) -> bool:
        """Whether ``rel`` is a symbolic link (local disk; object stores have none)."""
        return self.is_local and os.path.islink(self.path(rel))

    def size(self, rel: str) -> int:
        target = self.path(rel)
        return retry_call(lambda: int(self.fs.size(target)), policy=self.retry,
                          what=f"sizing {self.url}/{rel}")

    def list(self, rel: str = "") -> list[str]:
        """Names (not paths) directly below ``rel``; empty when it does not exist."""
        target = self.path(rel)
        if self.is_local:
            try:
                return sorted(os.listdir(target))
            except (FileNotFoundError, NotADirectoryError):
                return []

        def fn() -> list[str]:
            try:
                self.fs.invalidate_cache(target)
                entries = self.fs.ls(target, detail=False)
            except FileNotFoundError:
                return []
            return sorted({posixpath.basename(str(e).rstrip("/")) for e in entries} - {""})
        return retry_call(fn, policy=self.retry, what=f"listing {self.url}/{rel}")

    def delete(self, rel: str, *, recursive: bool = False) -> None:
        """Deletes a file (or a directory tree with ``recursive=True``); missing is fine."""
        target = self.path(rel)

        def fn() -> None:
            try:
                self.fs.rm(target, recursive=recursive)
            except FileNotFoundError:
                pass
        retry_call(fn, policy=self.retry, what=f"deleting {self.url}/{rel}")

    def cleanup_partials(self, rel: str = "") -> int:
        """Removes leftover ``*.partial-*`` temporaries below ``rel`` (local disk); returns the count."""
        if not self.is_local:
            return 0
        n = 0
        for dirpath, _dirs, files in os.walk(self.path(rel)):
            for name in files:
                if _PARTIAL in name:
                    _remove_quietly(os.path.join(dirpath, name))
                    n += 1
        return n

    # -- parallelism ---------------------------------------------------------------------------
    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]`` on the I/O thread pool, in order; the first error is raised."""
        items = list(items)
        if len(items) <= 1 or self.workers == 1:
            return [fn(x) for x in items]
        with cf.ThreadPoolExecutor(min(self.workers, len(items)), thread_name_prefix="ucp-io") as ex:
            return list(ex.map(fn, items))


def verify(data: Buffer, record: FileRecord, *, where: str) -> None:
    """Checks size and CRC32C of ``data`` against ``record``.

    Raises:
        ChecksumError: naming ``where`` and what differs.
    """
    size = memoryview(data).nbytes
    if size != record.size:
        raise ChecksumError(f"{where}: size {size} differs from the recorded {record.size} bytes "
                            "(truncated or replaced file); restore it or use another step")
    crc = _crc32c.crc32c(data)
    if crc != record.crc32c:
        raise ChecksumError(f"{where}: CRC32C {crc:#010x} differs from the recorded "
                            f"{record.crc32c:#010x} (the file is corrupt); restore it or use another step")


def open_regular(path: str, *, where: str | None = None, buffering: int = -1) -> BinaryIO:
    """Opens a local file for reading if it is a regular file (after links).

    A FIFO would block every reader (even the open), and a device such as ``/dev/zero`` says size
    0 and never ends, defeating every size bound: checkpoints hold only regular files. The open
    does not block (``O_NONBLOCK``, cleared once the file is known to be regular).

    Raises:
        FileNotFoundError: no such file.
        UnsafeInputError: not a regular file (names it and what it is).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or other special file")
            raise UnsafeInputError(f"{where or path}: is {kind}, not a regular file; a checkpoint holds "
                                   "only regular files (replace it with the real file)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def _read_bounded(f: BinaryIO, size: int, max_bytes: int | None) -> bytes:
    """The file's bytes, but at most ``max_bytes + 1`` whatever ``size`` (its stat) said: a
    file that grows while read cannot make the reader allocate more. Reads ``size + 1`` first
    (never a buffer of the bound itself, which may be far larger than the file)."""
    limit = None if max_bytes is None else max_bytes + 1
    chunks, got = [], 0
    want = size + 1 if limit is None else min(size + 1, limit)
    while want > 0:
        chunk = f.read(want)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
        want = 1 << 20 if limit is None else min(1 << 20, limit - got)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_size(size: int, *, record: FileRecord | None, max_bytes: int | None, where: str) -> None:
    if record is not None and size != record.size:
        raise ChecksumError(f"{where}: size {size} differs from the recorded {record.size} bytes "
                            "(truncated or replaced file); restore it or use another step")
    if max_bytes is not None and size > max_bytes:
        raise CorruptCheckpointError(f"{where}: more than the {max_bytes} bytes such a file may hold; "
                                     "it is damaged or not what it claims to be")


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    p = fs.protocol
    return (p,) if isinstance(p, str) else tuple(p)


def _link_exclusive(tmp: str, target: str) -> None:
    """Publishes the complete file ``tmp`` as ``target`` only if ``target`` does not exist
    (``link`` fails with EEXIST, where ``rename`` would replace), then drops ``tmp``."""
    try:
        os.link(tmp, target)
    except FileExistsError as e:
        raise CheckpointExistsError(target) from e
    except OSError:  # a filesystem without hard links: O_EXCL create, then the bytes
        try:
            dst_f = open(target, "xb")
        except FileExistsError as e:
            raise CheckpointExistsError(target) from e
        with open(tmp, "rb") as src, dst_f as dst:
            shutil.copyfileobj(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
    _remove_quietly(tmp)


def _create(path: str, directory: str, *, replace: bool = False, direct: bool = False) -> BinaryIO:
    """A new file opened for writing (unbuffered); ``directory`` is made only when missing, so
    writing many files into one directory costs no ``mkdir`` and ``stat`` per file. ``replace``:
    a file another process created there meanwhile (the same node written by two converting
    workers) is removed and the new one created in its place, a few times at most. ``direct``:
    opened with ``O_DIRECT`` where the filesystem takes it (else without)."""
    opener = direct_opener if direct else None
    for attempt in range(3):
        try:
            try:
                return open(path, "xb", buffering=0, opener=opener)
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
                return open(path, "xb", buffering=0, opener=opener)
        except FileExistsError:
            if not replace or attempt == 2:
                raise
            _remove_quietly(path)
    raise AssertionError("unreachable")  # pragma: no cover


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
