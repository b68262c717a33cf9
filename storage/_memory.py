"""Reusing freed memory in a process that moves gigabytes through short-lived tensors.

glibc gives each allocation above its (adaptive) mmap threshold fresh pages from the kernel
and returns them on free; a command that reads a parameter, writes it and frees it, a few hundred
times, then pays the kernel to zero every byte it allocates again (``clear_page``: measured with
``perf`` at about 40% of ``ucp reshard``'s CPU on the 217M model). :func:`keep_freed_memory`
raises the threshold to glibc's largest (32 MiB) and stops returning freed memory to the
kernel, so blocks up to that size are reused instead of zeroed again. For the ``ucp`` command's
own process only (a training job's allocator is not ucp's to change); no-op off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: glibc's largest mmap threshold on 64-bit hosts (HEAP_MAX_SIZE / 2).
MMAP_THRESHOLD = 32 << 20


def keep_freed_memory() -> bool:
    """Makes glibc keep and reuse freed blocks of up to 32 MiB (see the module); True when
    glibc took the settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
    return mallopt(_M_TOP_PAD, 64 << 20) == 1 and ok
