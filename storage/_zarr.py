"""zarr v3 stores over a :class:`~ucp.storage.Storage` root (local disk or any fsspec URL)."""

from __future__ import annotations

import re
from typing import Any

from ucp._errors import CorruptCheckpointError

from ._store import Storage

__all__ = ["zarr_store"]

# A chunk key of zarr v3's default encoding: ``.../c/0/1`` or ``.../c.0.1`` (``.../c`` for 0-d).
_CHUNK_KEY = re.compile(r"(?:^|/)c(?:[./]\d+)*$")


def zarr_store(storage: Storage, *, read_only: bool) -> Any:
    """A zarr store rooted at ``storage``'s root: ``LocalStore`` on disk, ``FsspecStore`` otherwise.

    Reads of a region fetch only the chunks (byte ranges on an object store) that hold it. A
    read-only store raises :class:`~ucp.CorruptCheckpointError` for a missing chunk instead of
    letting zarr fill it with the fill value: ucp writes every chunk, so a missing one is lost data.
    """
    import zarr.storage

    if storage.is_local:
        store = zarr.storage.LocalStore(storage.root, read_only=read_only)
    else:
        store = zarr.storage.FsspecStore.from_url(storage.url, storage_options=storage.storage_options or None,
                                                  read_only=read_only)
    return _strict_store(store, storage.url) if read_only else store


def _strict_store(store: Any, url: str) -> Any:
    from zarr.storage import WrapperStore

    class StrictChunkStore(WrapperStore):  # type: ignore[misc,type-arg]
        """Missing chunks are errors (naming the chunk), not fill values."""

        async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
            value = await self._store.get(key, prototype, byte_range)
            if value is None and _CHUNK_KEY.search(key):
                raise _missing(url, key)
            return value

        async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
            key_ranges = list(key_ranges)
            values = await self._store.get_partial_values(prototype, key_ranges)
            for (key, _), value in zip(key_ranges, values):
                if value is None and _CHUNK_KEY.search(key):
                    raise _missing(url, key)
            return values

    return StrictChunkStore(store)


def _missing(url: str, key: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{url.rstrip('/')}/{key}: chunk file missing (zarr would read it as "
                                  "zeros); the universal checkpoint lost data, convert it again")
