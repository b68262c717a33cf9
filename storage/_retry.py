"""Bounded retries with exponential backoff for transient storage errors."""

from __future__ import annotations

import dataclasses
import errno
import logging
import random
import time
from typing import Callable, TypeVar

from ucp.core._errors import StorageError, UcpError

__all__ = ["RetryPolicy", "is_transient", "retry_call"]

T = TypeVar("T")
log = logging.getLogger("ucp.storage")

_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EINTR, errno.EIO, errno.ETIMEDOUT, errno.EBUSY,
                               errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                               errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH})


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same storage call may succeed.

    Missing files, permissions, a full disk and ucp's own errors are final; timeouts, dropped
    connections and I/O errors that carry a transient errno are retried.
    """
    if isinstance(exc, UcpError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                        FileExistsError)):
        return False
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in _TRANSIENT_ERRNOS
    # botocore / aiohttp errors that s3fs lets through without translating them.
    name = type(exc).__name__
    return any(k in name for k in ("Connection", "Timeout", "Throttl", "ServerDisconnected",
                                   "ClientPayloadError", "ServiceUnavailable"))


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a storage call is retried.

    ``attempts`` counts the first try; the delay before retry ``i`` is
    ``min(max_delay, base_delay * 2**i)`` with +-25% jitter.
    """

    attempts: int = 5
    base_delay: float = 0.05
    max_delay: float = 2.0

    def delay(self, retry: int) -> float:
        d = min(self.max_delay, self.base_delay * (2 ** retry))
        return d * random.uniform(0.75, 1.25)


def retry_call(fn: Callable[[], T], *, policy: RetryPolicy, what: str) -> T:
    """Calls ``fn`` until it succeeds, a final error occurs, or ``policy.attempts`` run out.

    Raises:
        StorageError: when the attempts are exhausted or the error is final (its cause chained),
            except that ucp's own errors and ``FileNotFoundError`` pass through unchanged.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except (UcpError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - classified by retry_delay
            time.sleep(retry_delay(e, attempt, policy=policy, what=what, wrap_final=True))
    raise AssertionError("unreachable")


def retry_delay(exc: Exception, attempt: int, *, policy: RetryPolicy, what: str, wrap_final: bool) -> float:
    """After ``attempt`` (0-based) failed with ``exc``: the delay before the next attempt, logged;
    or raises: ``StorageError`` when the attempts are exhausted, and for a final error either a
    ``StorageError`` (``wrap_final``) or ``exc`` itself. The policy of :func:`retry_call`, shared
    with the retrying zarr store."""
    if not is_transient(exc):
        if wrap_final:
            raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
        raise exc
    if attempt + 1 == policy.attempts:
        raise StorageError(f"{what} failed after {policy.attempts} attempts; "
                           f"last error: {type(exc).__name__}: {exc}") from exc
    delay = policy.delay(attempt)
    log.warning("%s: transient %s (%s); retry %d/%d in %.2fs", what, type(exc).__name__, exc,
                attempt + 1, policy.attempts - 1, delay)
    return delay
