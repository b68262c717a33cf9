"""zarr v3 stores over a :class:`~ucp.storage.Storage` root (local disk or any fsspec URL)."""

from __future__ import annotations

import asyncio
import re
from typing import Any, Awaitable, Callable, TypeVar

from ucp.core._errors import CorruptCheckpointError, UcpError

from ucp.storage._retry import RetryPolicy, retry_delay
from ucp.storage._store import Storage

__all__ = ["zarr_store"]

T = TypeVar("T")
# A chunk key of zarr v3's default encoding: ``.../c/0/1`` or ``.../c.0.1`` (``.../c`` for 0-d).
_CHUNK_KEY = re.compile(r"(?:^|/)c(?:[./]\d+)*$")


def zarr_store(storage: Storage, *, read_only: bool) -> Any:
    """A zarr store rooted at ``storage``'s root: ``LocalStore`` on disk, ``FsspecStore`` otherwise.

    Reads of a region fetch only the chunks (byte ranges on an object store) that hold it. Every
    call is retried on transient errors with ``storage.retry``, as :class:`Storage` calls are. A
    read-only store raises :class:`~ucp.CorruptCheckpointError` for a missing chunk instead of
    letting zarr fill it with the fill value: ucp writes every chunk, so a missing one is lost data.
    """
    import zarr.storage

    if storage.is_local:
        store = zarr.storage.LocalStore(storage.root, read_only=read_only)
    else:
        store = zarr.storage.FsspecStore.from_url(storage.url, storage_options=storage.storage_options or None,
                                                  read_only=read_only)
    return _wrap(store, storage.url, storage.retry, strict=read_only)


async def _retried(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """``retry_call`` for coroutines: transient errors retried, zarr's own errors passed on."""
    for attempt in range(policy.attempts):
        try:
            return await fn()
        except (UcpError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - classified by retry_delay; zarr's own errors pass on
            await asyncio.sleep(retry_delay(e, attempt, policy=policy, what=what, wrap_final=False))
    raise AssertionError("unreachable")


def _wrap(store: Any, url: str, policy: RetryPolicy, *, strict: bool) -> Any:
    from zarr.storage import WrapperStore

    base = url.rstrip("/")

    class UcpStore(WrapperStore):  # type: ignore[misc,type-arg]
        """Retries transient errors; when ``strict``, a missing chunk is an error naming it."""

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            value = await _retried(lambda: self._store.get(key, prototype, byte_range), policy,
                                   f"reading {base}/{key}")
            if value is None and strict and _CHUNK_KEY.search(key):
                raise _missing(base, key)
            return value

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            key_ranges = list(key_ranges)
            values = await _retried(lambda: self._store.get_partial_values(prototype, key_ranges), policy,
                                    f"reading {len(key_ranges)} ranges below {base}")
            for (key, _), value in zip(key_ranges, values):
                if value is None and strict and _CHUNK_KEY.search(key):
                    raise _missing(base, key)
            return values

        async def exists(self, key: str) -> bool:
            return await _retried(lambda: self._store.exists(key), policy, f"checking {base}/{key}")

        async def set(self, key: str, value: Any) -> None:
            await _retried(lambda: self._store.set(key, value), policy, f"writing {base}/{key}")

        async def set_if_not_exists(self, key: str, value: Any) -> None:
            await _retried(lambda: self._store.set_if_not_exists(key, value), policy, f"writing {base}/{key}")

        async def delete(self, key: str) -> None:
            await _retried(lambda: self._store.delete(key), policy, f"deleting {base}/{key}")

        async def delete_dir(self, prefix: str) -> None:
            await _retried(lambda: self._store.delete_dir(prefix), policy, f"deleting {base}/{prefix}")

    return UcpStore(store)


def _missing(base: str, key: str) -> CorruptCheckpointError:
    # A damaged array zarr.json (another chunk grid or key encoding) also sends zarr to chunk
    # keys that do not exist, so the message names both places.
    array = key.rsplit("/c", 1)[0] if "/c" in key else key.rsplit("/", 1)[0]
    return CorruptCheckpointError(f"{base}/{key}: chunk file missing (zarr would read it as zeros), "
                                  f"or {base}/{array}/zarr.json is damaged; the universal checkpoint "
                                  "lost data, convert it again")
