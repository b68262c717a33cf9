"""Fault injection for reliability tests: flaky storage, a full disk, bit flips, timed kills.

Used by ``tests/reliability`` and ``scripts/reliability.py``; nothing here runs in a normal job.

* :class:`FlakyFileSystem` (fsspec protocol ``ucpflaky://``) wraps local files and fails a given
  fraction of calls with transient errors, the way a congested object store does. Call
  :func:`install` in every process that opens such a URL (spawned ranks included).
* :func:`disk_full` makes writes below a directory fail with ``ENOSPC`` once a byte budget is
  spent, part-way through a file, like a filesystem that fills up during a save.
* :class:`TcpProxy` stands between a client and a server on 127.0.0.1; ``down()`` is a network
  outage (listener closed, every open connection reset), ``up()`` ends it.
* :func:`flip_bit`, :func:`truncate` damage a file; :func:`kill_after` SIGKILLs this process
  after a delay (a crash at a random point of whatever it is doing).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import random
import signal
import socket
import struct
import threading
import time
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["FlakyFileSystem", "install", "flaky_url", "injected_counts", "disk_full", "flip_bit",
           "truncate", "kill_after", "TcpProxy", "PROTOCOL"]

PROTOCOL = "ucpflaky"
#: Per-process totals: calls seen and faults injected by every FlakyFileSystem (for reports).
_COUNTS = {"calls": 0, "faults": 0, "after_effect": 0}
_COUNTS_LOCK = threading.Lock()


def injected_counts(reset: bool = False) -> dict[str, int]:
    """Calls seen and faults injected in this process (``after_effect``: the call took effect,
    then failed, as when an object store's reply is lost)."""
    with _COUNTS_LOCK:
        out = dict(_COUNTS)
        if reset:
            for k in _COUNTS:
                _COUNTS[k] = 0
    return out


class FlakyFileSystem(fsspec.AbstractFileSystem):
    """Local files behind an fsspec interface that fails ``fail_rate`` of calls, transiently.

    Args:
        fail_rate: probability that a call raises (``ConnectionResetError``, ``TimeoutError`` or
            ``OSError(EIO)``, which ucp classifies as transient).
        seed: seeds this instance's random choices (fsspec builds one instance per Storage).
        ops: method names to fail (default: every data and listing call).
        effect_rate: among failing writes, the share that fail after taking effect.
    """

    protocol = PROTOCOL
    cachable = False  # every Storage gets its own instance and random stream
    root_marker = "/"
    _FAULTY = ("cat_file", "pipe_file", "info", "ls", "rm_file", "rm", "exists", "_open")

    def __init__(self, fail_rate: float = 0.1, seed: int | None = 0, ops: tuple[str, ...] | None = None,
                 effect_rate: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_rate, self.effect_rate = float(fail_rate), float(effect_rate)
        self.ops = tuple(ops) if ops is not None else self._FAULTY
        self._rng = random.Random(time.monotonic_ns() if seed is None else seed)
        self._lock = threading.Lock()
        self.local = LocalFileSystem(auto_mkdir=True)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = str(path)
        if path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return path.rstrip("/") or "/"

    def _roll(self, op: str) -> tuple[str | None, Exception]:
        """(None: no fault, "before", or "after": the call took effect, then failed; the error)."""
        with self._lock:
            fail = op in self.ops and self._rng.random() < self.fail_rate
            after = fail and op == "pipe_file" and self._rng.random() < self.effect_rate
            kind = self._rng.randrange(3)
        with _COUNTS_LOCK:
            _COUNTS["calls"] += 1
            _COUNTS["faults"] += int(fail)
            _COUNTS["after_effect"] += int(after)
        error = (ConnectionResetError(errno.ECONNRESET, f"injected: connection reset ({op})"),
                 TimeoutError(f"injected: timed out ({op})"),
                 OSError(errno.EIO, f"injected: I/O error ({op})"))[kind]
        return ("after" if after else "before") if fail else None, error

    def _call(self, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        fault, error = self._roll(op)
        if fault == "before":
            raise error
        out = fn(*args, **kwargs)
        if fault == "after":
            raise error
        return out

    # -- the calls ucp's Storage and zarr's FsspecStore make ----------------------------------
    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any) -> bytes:
        return self._call("cat_file", self.local.cat_file, self._strip_protocol(path), start=start, end=end)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        # mode="create" (create-if-absent) passes through: a fault after it took effect then makes
        # the retry find the object, as a lost S3 answer to a conditional put does
        return self._call("pipe_file", self.local.pipe_file, self._strip_protocol(path), value, mode=mode)

    def info(self, path: str, **kw: Any) -> dict[str, Any]:
        return self._call("info", self.local.info, self._strip_protocol(path))

    def ls(self, path: str, detail: bool = True, **kw: Any) -> list[Any]:
        return self._call("ls", self.local.ls, self._strip_protocol(path), detail=detail)

    def exists(self, path: str, **kw: Any) -> bool:
        return self._call("exists", self.local.exists, self._strip_protocol(path))

    def rm_file(self, path: str) -> None:
        return self._call("rm_file", self.local.rm_file, self._strip_protocol(path))

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        return self._call("rm", self.local.rm, self._strip_protocol(path), recursive=recursive)

    def mkdir(self, path: str, create_parents: bool = True, **kw: Any) -> None:
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def invalidate_cache(self, path: str | None = None) -> None:
        pass

    def _open(self, path: str, mode: str = "rb", **kw: Any) -> Any:
        return self._call("_open", self.local._open, self._strip_protocol(path), mode=mode)


def install() -> None:
    """Registers ``ucpflaky://`` with fsspec in this process (idempotent)."""
    fsspec.register_implementation(PROTOCOL, FlakyFileSystem, clobber=True)


def flaky_url(path: str | os.PathLike[str]) -> str:
    """The ``ucpflaky://`` URL of a local directory."""
    return f"{PROTOCOL}://{os.path.abspath(os.fspath(path))}"


class _FullFile(io.RawIOBase):
    """A file opened for writing that shares a byte budget with every other one in the context."""

    def __init__(self, f: Any, budget: list[int]) -> None:
        super().__init__()
        self._f, self._budget = f, budget

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        room = self._budget[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        n = self._f.write(view[:room])
        self._budget[0] -= n
        return n  # a short write; the caller's next write hits the full disk

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@contextlib.contextmanager
def disk_full(root: str | os.PathLike[str], *, free_bytes: int) -> Iterator[list[int]]:
    """Within the context, files opened for writing below ``root`` (by ``open``/``io.open``,
    as ucp's storage and zarr's local store do) share ``free_bytes`` of space; the write that
    crosses it is cut short and the next one raises ``OSError(ENOSPC)``. Yields the budget
    (``[bytes left]``). Process-wide: use it in a process of its own (a rank) or a test.
    """
    root = os.path.abspath(os.fspath(root))
    budget = [int(free_bytes)]
    real_open = io.open

    def full_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wax+")
        if writing and isinstance(file, (str, bytes, os.PathLike)) and \
                os.path.abspath(os.fsdecode(file)).startswith(root + os.sep):
            return _FullFile(f, budget)
        return f

    builtins.open = io.open = full_open  # type: ignore[assignment]
    try:
        yield budget
    finally:
        builtins.open = io.open = real_open  # type: ignore[assignment]


def flip_bit(path: str | os.PathLike[str], offset: int, bit: int = 0) -> None:
    """Flips bit ``bit`` of byte ``offset`` of a file, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ (1 << bit)]))


def truncate(path: str | os.PathLike[str], size: int) -> None:
    """Cuts a file to ``size`` bytes."""
    os.truncate(path, size)


def kill_after(seconds: float) -> threading.Timer:
    """SIGKILLs this process after ``seconds`` (a daemon timer; cancel() it to call it off)."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGKILL))
    timer.daemon = True
    timer.start()
    return timer


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port``.

    ``down()`` closes the listening socket and resets every open connection, as an outage of the
    server or the network does (keep-alive connections included, unlike merely stopping an HTTP
    server's accept loop); ``up()`` listens on the same port again.
    """

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.port = port
        self.up()

    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(64)
            self.port = s.getsockname()[1]
            self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            _close(listener, reset=False)
        for c in conns:
            _close(c, reset=True)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                _close(client, reset=True)
                continue
            with self._lock:
                if self._listener is not listener:
                    _close(client, reset=True)
                    _close(server, reset=True)
                    return
                self._conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                gone = [c for c in (src, dst) if c in self._conns]
                self._conns.difference_update(gone)
            for c in gone:
                _close(c, reset=False)


def _close(sock: socket.socket, *, reset: bool) -> None:
    try:
        if reset:  # RST, not FIN: the peer sees "connection reset"
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
