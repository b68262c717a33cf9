"""zarr v3 stores over a :class:`~ucp.storage.Storage` root (local disk or any fsspec URL)."""

from __future__ import annotations

from typing import Any

from ._store import Storage

__all__ = ["zarr_store"]


def zarr_store(storage: Storage, *, read_only: bool) -> Any:
    """A zarr store rooted at ``storage``'s root: ``LocalStore`` on disk, ``FsspecStore`` otherwise.

    Reads of a region fetch only the chunks (byte ranges on an object store) that hold it.
    """
    import zarr.storage

    if storage.is_local:
        return zarr.storage.LocalStore(storage.root, read_only=read_only)
    return zarr.storage.FsspecStore.from_url(storage.url, storage_options=storage.storage_options or None,
                                             read_only=read_only)
