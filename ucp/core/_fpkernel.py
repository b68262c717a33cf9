"""The fingerprints' inner loop compiled from C on first use, when a C compiler is at hand.

:mod:`ucp.core._fingerprint` sums ``rw[i] * cols[j] * g(bits[i, j])`` over blocks of element bit
patterns. numpy does that in a widening copy and an integer ``matmul`` (two passes over each
slab, a Python step per 64 Ki elements); ``_fpkernel.c`` does it in one pass, about 2-3x faster
on x86-64 with AVX-512, and as one call per block that lets go of the GIL throughout (ctypes), so
a fingerprinting thread overlaps the writing thread instead of taking turns with it.

The shared library is built once per machine kind with the system's C compiler (``$CC``, else
Python's, else ``cc``; about 0.2 s) into ``$UCP_CACHE_DIR`` (default ``$XDG_CACHE_HOME/ucp`` or
``~/.cache/ucp``), named after a hash of the source, the compiler and the platform; processes
that build it at the same time each write their own file and rename it into place. When there is
no compiler, the build fails, or the loaded library does not give numpy's sums on a test block,
the numpy code runs instead (same values, slower), said once in the log. ``UCP_FINGERPRINT_KERNEL``
chooses: ``auto`` (default), ``numpy`` (never compile) or ``c`` (fail if it cannot be had).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["KernelUnavailable", "rows_function", "reset"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_fpkernel.c")
#: What ``ucp_fpkernel_version()`` must return (bumped with the source's entry points).
VERSION = 1
_TYPES = {1: ctypes.c_int8, 2: ctypes.c_int16, 4: ctypes.c_int32, 8: ctypes.c_int64}
_LOCK = threading.Lock()
_loaded: dict[int, Callable[..., int]] | None = None
_tried = False


class KernelUnavailable(RuntimeError):
    """``UCP_FINGERPRINT_KERNEL=c`` and the compiled kernel cannot be built or loaded."""


def _mode() -> str:
    mode = os.environ.get("UCP_FINGERPRINT_KERNEL", "auto").strip().lower() or "auto"
    if mode not in ("auto", "numpy", "c"):
        raise ValueError(f"UCP_FINGERPRINT_KERNEL={mode!r}: expected auto, numpy or c")
    return mode


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("UCP_CACHE_DIR"):
        return Path(os.environ["UCP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ucp"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc"):
        if cand and (path := shutil.which(cand)):
            return path
    return None


def _build(cc: str) -> Path:
    """The shared library for this source, compiler and platform (built if not cached)."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, cc.encode(), platform.machine().encode(), sys.platform.encode()]))
    out_dir = cache_dir()
    lib = out_dir / f"fpkernel-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{lib.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        for extra in ([], ["-DUCP_NO_CLONES"]):  # without per-ISA copies if the compiler cannot make them
            done = subprocess.run([cc, "-O3", "-shared", "-fPIC", *extra, "-o", str(tmp), str(SOURCE)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise OSError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        tmp.unlink(missing_ok=True)
    return lib


def _load(path: Path) -> dict[int, Callable[..., int]]:
    lib = ctypes.CDLL(str(path))  # a CDLL call releases the GIL
    if lib.ucp_fpkernel_version() != VERSION:
        raise OSError(f"{path} is version {lib.ucp_fpkernel_version()}, not {VERSION}")
    fns = {}
    for size, ctype in _TYPES.items():
        fn = getattr(lib, f"ucp_rows_{size}")
        fn.restype = ctypes.c_uint64
        fn.argtypes = [ctypes.POINTER(ctype), ctypes.c_ssize_t, ctypes.c_size_t, ctypes.c_size_t,
                       ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
        fns[size] = fn
    return fns


def _self_check(fns: dict[int, Callable[..., int]], numpy_rows: Callable[..., int]) -> None:
    """The compiled sums must equal numpy's on a block of every element size (strided rows)."""
    rng = np.random.default_rng(0)
    cols = rng.integers(0, 2**63, 37, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    rw = rng.integers(0, 2**63, 5, dtype=np.uint64)
    for size in _TYPES:
        bits = rng.integers(0, 256, 5 * 41 * size, dtype=np.uint8).view(f"i{size}").reshape(5, 41)[:, 2:39]
        if call(fns[size], bits, cols, rw) != numpy_rows(bits, cols, rw):
            raise OSError(f"the compiled kernel's sums of {size}-byte elements differ from numpy's")


def call(fn: Callable[..., int], bits: np.ndarray, cols: np.ndarray, rw: np.ndarray) -> int:
    """``fn`` over ``bits`` (2-D, contiguous columns: see :func:`fits`)."""
    m, k = bits.shape
    if m == 0 or k == 0:
        return 0
    ptr = ctypes.POINTER(_TYPES[bits.itemsize])
    u64 = ctypes.POINTER(ctypes.c_uint64)
    return int(fn(bits.ctypes.data_as(ptr), bits.strides[0] // bits.itemsize, m, k,
                  cols.ctypes.data_as(u64), rw.ctypes.data_as(u64)))


def fits(bits: np.ndarray, cols: np.ndarray, rw: np.ndarray) -> bool:
    """Whether the compiled kernel takes these arrays as they are."""
    return (bits.ndim == 2 and bits.itemsize in _TYPES and (bits.shape[1] <= 1 or bits.strides[1] == bits.itemsize)
            and bits.strides[0] % bits.itemsize == 0 and cols.dtype == np.uint64 and rw.dtype == np.uint64
            and cols.flags.c_contiguous and rw.flags.c_contiguous and len(cols) >= bits.shape[1]
            and len(rw) >= bits.shape[0])


def rows_function(itemsize: int, numpy_rows: Callable[..., int]) -> Callable[..., int] | None:
    """The compiled row-sum function for elements of ``itemsize`` bytes, or None (numpy then).

    ``numpy_rows`` is the numpy implementation the compiled one is checked against once.

    Raises:
        KernelUnavailable: ``UCP_FINGERPRINT_KERNEL=c`` and it cannot be had.
    """
    global _loaded, _tried
    if _loaded is None and not _tried:
        with _LOCK:
            if not _tried:
                _loaded = _attempt(numpy_rows)
                _tried = True
    if _loaded is None and _mode() == "c":
        raise KernelUnavailable("UCP_FINGERPRINT_KERNEL=c but the compiled fingerprint kernel could not be built "
                                "or loaded (see the log); unset it to use numpy")
    return None if _loaded is None else _loaded.get(itemsize)


def _attempt(numpy_rows: Callable[..., int]) -> dict[int, Callable[..., int]] | None:
    mode = _mode()
    if mode == "numpy":
        return None
    cc = _compiler()
    why = "no C compiler found ($CC, cc, gcc)"
    if cc is not None:
        try:
            fns = _load(_build(cc))
            _self_check(fns, numpy_rows)
            log.debug("fingerprints: compiled kernel loaded (%s)", cc)
            return fns
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            why = f"{type(e).__name__}: {e}"
    (log.warning if mode == "c" else log.info)(
        "fingerprints: using numpy, about 2x slower than the compiled kernel (%s)", why)
    return None


def reset() -> None:
    """Forgets the loaded kernel (tests: the next fingerprint decides again)."""
    global _loaded, _tried
    with _LOCK:
        _loaded, _tried = None, False
