"""Where a plan's bytes come from: a universal checkpoint (chunked arrays read by region), or a
distributed checkpoint converted on the fly (each parameter consolidated whole, never written).

Both adapters answer the planning questions (names, info, groups) and the reading ones
(:meth:`array`, :meth:`read`); the executor in :mod:`._read` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ucp._errors import CorruptCheckpointError
from ucp._stfile import dtype_from_name
from ucp._universal import GROUP_META, UniversalCheckpoint, from_numpy, open_universal
from ucp.engines._base import ParamInfo, SourceCheckpoint
from ucp.storage import Storage

from ._zero import Region

__all__ = ["ArrayInfo", "ArraySource", "UniversalSource", "ConvertingSource", "open_array_source",
           "is_universal"]


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One stored array: its shape, the dtype reads return, and its chunking.

    ``chunks`` is None when the array can only be read whole (a converted-on-the-fly source);
    ``itemsize`` is the stored element size (bytes read are counted with it).
    """

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    chunks: tuple[int, ...] | None
    itemsize: int


class ArraySource:
    """The interface the resharder reads through (see the two implementations below)."""

    url: str
    step: int | None
    topology: Any
    spec_text: str | None = None
    spec_constants: Mapping[str, int] | None = None
    concurrent = True  # reads may run on several threads at once

    def names(self) -> list[str]:
        raise NotImplementedError

    def info(self, name: str) -> ParamInfo:
        raise NotImplementedError

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def buffer_names(self) -> list[str]:
        raise NotImplementedError

    def array(self, name: str, state: str | None) -> ArrayInfo:
        """Shape, dtype and chunking of a parameter's state (``state=None``: a buffer)."""
        raise NotImplementedError

    def read(self, name: str, state: str | None, region: Region | None) -> torch.Tensor:
        """The values of ``region`` (canonical order; None: all) of an array, logical dtype."""
        raise NotImplementedError


def _param_source(info: ParamInfo, state: str) -> tuple[str, torch.dtype | None]:
    """Which stored state holds ``state``: an fp32 model keeps its weights once, as ``fp32``."""
    if state == "param" and "param" not in info.states and "fp32" in info.states:
        return "fp32", info.dtype
    return state, None


class UniversalSource(ArraySource):
    """A universal checkpoint; region reads fetch only the zarr chunks that hold them."""

    def __init__(self, ckpt: UniversalCheckpoint) -> None:
        self.ckpt, self.url = ckpt, ckpt.url
        self.step, self.topology = ckpt.step, ckpt.topology
        meta = ckpt.metadata
        self.spec_text, self.spec_constants = meta.get("spec"), meta.get("spec_constants")
        self._params: dict[str, Any] = dict(meta.get("params") or {})
        self._buffers: dict[str, Any] = dict(meta.get("buffers") or {})
        self._groups = list(meta.get("param_groups") or [])
        # (name, state) -> (zarr array, stored logical dtype, info, cast to apply or None)
        self._arrays: dict[tuple[str, str | None], tuple[Any, torch.dtype, ArrayInfo, Any]] = {}
        self._lock = threading.Lock()
        self._store = None

    def names(self) -> list[str]:
        return list(self._params)

    def info(self, name: str) -> ParamInfo:
        return self.ckpt.info(name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [dict(g) for g in self._groups]

    def buffer_names(self) -> list[str]:
        return list(self._buffers)

    def _open(self, name: str, state: str | None) -> tuple[Any, torch.dtype, ArrayInfo, Any]:
        key = (name, state)
        with self._lock:
            if key in self._arrays:
                return self._arrays[key]
        import zarr

        from ucp.storage import zarr_store

        cast = None
        if state is None:
            path = self._buffers[name]["path"]
        else:
            info = self.info(name)
            stored, cast = _param_source(info, state)
            if stored not in info.states:
                raise KeyError(f"parameter {name!r} has no state {state!r} in {self.url}; it has "
                               f"{list(info.states)}")
            path = f"{self._params[name]['path']}/{stored}"
        if self._store is None:
            self._store = zarr_store(self.ckpt.storage, read_only=True)
        try:
            arr = zarr.open_array(self._store, path=path, mode="r")
        except (FileNotFoundError, KeyError) as e:
            raise CorruptCheckpointError(f"{self.url}/{path}: array missing ({e})") from e
        dtype = dtype_from_name(arr.attrs.get("ucp_dtype", ""))
        info_ = ArrayInfo(tuple(arr.shape), cast or dtype, tuple(arr.chunks), arr.dtype.itemsize)
        with self._lock:
            self._arrays[key] = (arr, dtype, info_, cast if cast is not None and cast != dtype else None)
            return self._arrays[key]

    def array(self, name: str, state: str | None) -> ArrayInfo:
        return self._open(name, state)[2]

    def read(self, name: str, state: str | None, region: Region | None) -> torch.Tensor:
        arr, dtype, _info, cast = self._open(name, state)
        sel = ... if region is None else tuple(slice(a, b) for a, b in region)
        try:
            data = arr[sel]
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.url}: reading {name!r} ({state or 'buffer'}) "
                                         f"failed: {e}; the chunk is damaged, convert again") from e
        t = from_numpy(np.asarray(data), dtype)
        return t if cast is None else t.to(cast)


class ConvertingSource(ArraySource):
    """A distributed checkpoint read through its engine plugin: every read consolidates the
    whole parameter state (the plugin's own reads), and the executor slices what it needs."""

    concurrent = False  # plugin readers are not promised to be thread-safe

    def __init__(self, source: SourceCheckpoint, url: str) -> None:
        self.source, self.url = source, url
        self.step, self.topology = source.step, source.topology
        self._names = source.names()
        self._groups = source.param_groups()
        self._buffers: dict[str, torch.Tensor] | None = None

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> ParamInfo:
        return self.source.info(name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        from ucp._convert import _jsonable

        return _jsonable([dict(g) for g in self._groups])

    def _buffer_table(self) -> dict[str, torch.Tensor]:
        if self._buffers is None:
            self._buffers = dict(self.source.buffers())
        return self._buffers

    def buffer_names(self) -> list[str]:
        return list(self._buffer_table())

    def array(self, name: str, state: str | None) -> ArrayInfo:
        if state is None:
            t = self._buffer_table()[name]
            return ArrayInfo(tuple(t.shape), t.dtype, None, t.element_size())
        info = self.info(name)
        dtype = info.dtype if state == "param" else torch.float32 if state == "fp32" else None
        shape = None if state == "step" else tuple(info.shape)
        return ArrayInfo(shape, dtype, None, 0 if dtype is None else dtype.itemsize)

    def read(self, name: str, state: str | None, region: Region | None) -> torch.Tensor:
        if state is None:
            t = self._buffer_table()[name]
        else:
            stored, cast = _param_source(self.info(name), state)
            t = self.source.read(name, stored)
            t = t if cast is None else t.to(cast)
        return t if region is None else t[tuple(slice(a, b) for a, b in region)]


def is_universal(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` holds a universal checkpoint (complete or not)."""
    import json

    storage = Storage(url, storage_options=storage_options)
    if not storage.exists(GROUP_META):
        return False
    try:
        doc = json.loads(storage.read(GROUP_META))
        return doc["attributes"]["ucp"]["kind"] == "ucp-universal"
    except (ValueError, KeyError, TypeError):
        return False


def open_array_source(src: Any, *, engine: str = "auto", spec: Any = None, tag: str | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> ArraySource:
    """An :class:`ArraySource` for ``src``: an ArraySource, a UniversalCheckpoint, a
    SourceCheckpoint, or a URL of a universal checkpoint or of any checkpoint ``ucp convert``
    reads (``engine``/``spec``/``tag`` then pick and read the source, as for convert).
    """
    if isinstance(src, ArraySource):
        return src
    if isinstance(src, UniversalCheckpoint):
        return UniversalSource(src)
    if isinstance(src, SourceCheckpoint):
        return ConvertingSource(src, getattr(src, "url", type(src).__name__))
    url = str(src)
    if engine in ("auto", "universal") and is_universal(url, storage_options):
        return UniversalSource(open_universal(url, storage_options=storage_options))
    from ucp._convert import open_source

    source, _found = open_source(url, engine=engine, spec=spec, tag=tag,
                                 storage_options=storage_options)
    return ConvertingSource(source, url)


def read_many(source: ArraySource, keys: Sequence[tuple[str, str | None]]) -> list[ArrayInfo]:
    """:meth:`ArraySource.array` of every key (array metadata, read in parallel)."""
    storage = getattr(getattr(source, "ckpt", None), "storage", None)
    if storage is None or not source.concurrent:
        return [source.array(n, s) for n, s in keys]
    return storage.map(lambda k: source.array(*k), keys)
