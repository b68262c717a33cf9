"""Process-wide counters of the bytes ucp reads from storage (every reader goes through them).

Resharding promises that a rank reads only the bytes it needs; these counters are how that is
measured (tests, ``benchmarks/resume.py``) without trusting the planner's own estimate.
"""

from __future__ import annotations

import dataclasses
import threading

__all__ = ["ReadCounter", "read_counter", "count_read"]


@dataclasses.dataclass(frozen=True)
class ReadCounter:
    """A snapshot of the counters: bytes read and read calls since the process started."""

    bytes: int = 0
    calls: int = 0

    def __sub__(self, other: ReadCounter) -> ReadCounter:
        return ReadCounter(self.bytes - other.bytes, self.calls - other.calls)


_lock = threading.Lock()
_bytes = 0
_calls = 0


def count_read(nbytes: int) -> None:
    """Adds one read of ``nbytes`` (called by every storage read, from any thread)."""
    global _bytes, _calls
    with _lock:
        _bytes += nbytes
        _calls += 1


def read_counter() -> ReadCounter:
    """The counters now; subtract two snapshots to measure what happened in between.

    Example:
        >>> before = read_counter()
        >>> ...  # load something
        >>> (read_counter() - before).bytes
    """
    with _lock:
        return ReadCounter(_bytes, _calls)
