"""Where a plan's bytes come from: a universal checkpoint (chunked arrays read by region), or a
distributed checkpoint converted on the fly (each parameter consolidated whole, never written).

Both adapters answer the planning questions (names, info, groups) and the reading ones
(:meth:`array`, :meth:`read`, :meth:`iter_region`); the executor in :mod:`._read` needs nothing
else.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ucp._errors import CorruptCheckpointError, UcpError
from ucp._meta import MAX_JSON_BYTES
from ucp._shard import ChunkReader, Layout, layout_of
from ucp._stfile import dtype_from_name
from ucp._universal import (GROUP_META, UniversalCheckpoint, _meta_crc, from_numpy, open_universal,
                            read_array_meta, to_numpy)
from ucp.engines._base import ParamInfo, SourceCheckpoint, cut
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
    partial = False  # an unchunked array's region read fetches only the bytes of that region

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

    def iter_region(self, name: str, state: str | None, region: Region) -> Iterator[tuple[Region, torch.Tensor]]:
        """``region`` of an array in pieces ``(sub-region, values)`` that tile it (for a chunked
        array and a region of whole chunks: chunk by chunk, so memory holds one chunk). A piece
        may share memory with the next one: copy it out before asking for the next."""
        yield region, self.read(name, state, region)


def _param_source(info: ParamInfo, state: str) -> tuple[str, torch.dtype | None]:
    """Which stored state holds ``state``: an fp32 model keeps its weights once, as ``fp32``."""
    if state == "param" and "param" not in info.states and "fp32" in info.states:
        return "fp32", info.dtype
    return state, None


@dataclasses.dataclass
class _Array:
    """An opened universal array: where it is, what it holds, and how to read it."""

    path: str
    info: ArrayInfo
    dtype: torch.dtype  # the stored logical dtype
    cast: torch.dtype | None  # applied after reading (an fp32 model's ``param``)
    np_dtype: Any  # the stored numpy dtype (bits for bf16 and friends)
    plain: bool  # chunk files read directly; otherwise through zarr
    zarr: Any = None
    layout: Layout | None = None  # how the chunks lie in files (plain only)


class UniversalSource(ArraySource):
    """A universal checkpoint; region reads fetch only the chunks that hold them.

    Arrays laid out as ucp writes them (regular chunks, raw little-endian bytes + CRC32C) are
    read chunk file by chunk file, each checked against its CRC32C; any other layout goes
    through zarr.
    """

    def __init__(self, ckpt: UniversalCheckpoint) -> None:
        self.ckpt, self.url = ckpt, ckpt.url
        self.step, self.topology = ckpt.step, ckpt.topology
        meta = ckpt.metadata
        self.spec_text, self.spec_constants = meta.get("spec"), meta.get("spec_constants")
        self._params: dict[str, Any] = dict(meta.get("params") or {})
        self._buffers: dict[str, Any] = dict(meta.get("buffers") or {})
        self._groups = list(meta.get("param_groups") or [])
        self._arrays: dict[tuple[str, str | None], _Array] = {}
        self._lock = threading.Lock()
        self._store = None
        self._reader = ChunkReader(ckpt.storage, ckpt.url)

    def names(self) -> list[str]:
        return list(self._params)

    def info(self, name: str) -> ParamInfo:
        return self.ckpt.info(name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [dict(g) for g in self._groups]

    def buffer_names(self) -> list[str]:
        return list(self._buffers)

    def _path(self, name: str, state: str | None) -> tuple[str, torch.dtype | None]:
        if state is None:
            return self._buffers[name]["path"], None
        info = self.info(name)
        stored, cast = _param_source(info, state)
        if stored not in info.states:
            raise KeyError(f"parameter {name!r} has no state {state!r} in {self.url}; it has "
                           f"{list(info.states)}")
        return f"{self._params[name]['path']}/{stored}", cast

    def _open(self, name: str, state: str | None) -> _Array:
        key = (name, state)
        with self._lock:
            if key in self._arrays:
                return self._arrays[key]
        path, cast = self._path(name, state)
        where = f"{self.url}/{path}/zarr.json"
        entry = self._buffers[name] if state is None else self._params[name]
        want_crc = _meta_crc(entry, None if state is None else path.rsplit("/", 1)[1])
        try:
            meta = json.loads(read_array_meta(self.ckpt.storage, self.url, path, want_crc))
            layout = layout_of(meta)
            plain = layout is not None
            if layout is not None:
                np_dtype, shape, chunks = layout.dtype, layout.shape, layout.chunks
            else:
                zarr_array = self._zarr(path)
                np_dtype, shape, chunks = zarr_array.dtype, tuple(zarr_array.shape), tuple(zarr_array.chunks)
                outer = tuple(getattr(zarr_array, "shards", None) or chunks)
                if len(outer) != len(shape) or not all(type(c) is int and c >= 1 for c in outer):
                    raise CorruptCheckpointError(f"{where}: shards {list(outer)} are not valid; convert "
                                                 "the checkpoint again")
            dtype = dtype_from_name((meta.get("attributes") or {}).get("ucp_dtype", ""))
            if to_numpy(torch.empty(0, dtype=dtype)).dtype != np_dtype:
                raise CorruptCheckpointError(f"{where}: {np_dtype} data does not hold the {dtype} the "
                                             "array's attributes name; convert the checkpoint again")
        except UcpError:
            raise
        except FileNotFoundError as e:
            raise CorruptCheckpointError(f"{where} is missing; convert the checkpoint again") from e
        except (ValueError, KeyError, TypeError, AttributeError, ArithmeticError) as e:
            raise CorruptCheckpointError(f"{where}: unreadable array metadata ({e}); convert the "
                                         "checkpoint again") from e
        if len(chunks) != len(shape) or not all(type(c) is int and c >= 1 for c in chunks) \
                or not all(type(n) is int and n >= 0 for n in shape):
            raise CorruptCheckpointError(f"{where}: shape {list(shape)} / chunks {list(chunks)} are "
                                         "not valid; convert the checkpoint again")
        want = None if state == "step" else tuple((self._buffers[name] if state is None
                                                   else self._params[name])["shape"])
        if want is not None and shape != want:
            raise CorruptCheckpointError(f"{self.url}/{path}: array of shape {list(shape)}, the group "
                                         f"metadata records {list(want)}; convert the checkpoint again")
        info = ArrayInfo(shape, cast or dtype, chunks, np_dtype.itemsize)
        opened = _Array(path, info, dtype, cast if cast not in (None, dtype) else None, np_dtype,
                        plain, None if plain else zarr_array, layout)
        with self._lock:
            return self._arrays.setdefault(key, opened)

    def _zarr(self, path: str) -> Any:
        import zarr

        from ucp.storage import zarr_store

        if self._store is None:
            self._store = zarr_store(self.ckpt.storage, read_only=True)
        try:
            return zarr.open_array(self._store, path=path, mode="r")
        except (FileNotFoundError, KeyError) as e:
            raise CorruptCheckpointError(f"{self.url}/{path}: array missing ({e})") from e

    def array(self, name: str, state: str | None) -> ArrayInfo:
        return self._open(name, state).info

    def read(self, name: str, state: str | None, region: Region | None) -> torch.Tensor:
        a = self._open(name, state)
        if a.zarr is None:
            a.zarr = self._zarr(a.path)
        sel = ... if region is None else tuple(slice(lo, hi) for lo, hi in region)
        try:
            data = a.zarr[sel]
        except UcpError:  # e.g. a missing chunk, named by the store
            raise
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.url}: reading {name!r} ({state or 'buffer'}) "
                                         f"failed: {e}; the chunk is damaged, convert again") from e
        t = from_numpy(np.asarray(data), a.dtype)
        return t if a.cast is None else t.to(a.cast)

    def iter_region(self, name: str, state: str | None, region: Region) -> Iterator[tuple[Region, torch.Tensor]]:
        a = self._open(name, state)
        info = a.info
        if not a.plain or any(lo % c or (hi % c and hi != s) for (lo, hi), c, s in
                              zip(region, info.chunks, info.shape)):
            yield region, self.read(name, state, region)
            return
        ranges = [range(lo // c, -(-hi // c)) for (lo, hi), c in zip(region, info.chunks)]
        for idx in itertools.product(*ranges):
            sub = tuple((i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, info.chunks, info.shape))
            t = from_numpy(self._chunk(a, idx), a.dtype)
            yield sub, t if a.cast is None else t.to(a.cast)

    def _chunk(self, a: _Array, idx: tuple[int, ...]) -> np.ndarray:
        """One stored chunk, checked against its CRC32C and cut to the array's edge. ucp writes
        every chunk, so a missing one is lost data (zarr would read it as zeros)."""
        assert a.layout is not None
        return self._reader.chunk(a.path, a.layout, idx)


class ConvertingSource(ArraySource):
    """A distributed checkpoint read through its engine plugin: every read consolidates the
    whole parameter state (the plugin's own reads), and the executor slices what it needs."""

    @property
    def concurrent(self) -> bool:  # type: ignore[override]
        """Plugin readers are not promised to be thread-safe, except those that read partially
        (they read many small boxes, and declare themselves safe to call from several threads)."""
        return self.partial

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

    @property
    def partial(self) -> bool:
        """Whether the plugin reads a region by reading only the bytes that hold it."""
        return bool(getattr(self.source, "partial_reads", False))

    def read(self, name: str, state: str | None, region: Region | None) -> torch.Tensor:
        if state is None:
            return cut(self._buffer_table()[name], region)
        stored, cast = _param_source(self.info(name), state)
        t = self.source.read(name, stored, region)
        return t if cast is None else t.to(cast)

    def iter_region(self, name: str, state: str | None, region: Region) -> Iterator[tuple[Region, torch.Tensor]]:
        if state is None or not self.partial:
            yield region, self.read(name, state, region)
            return
        stored, cast = _param_source(self.info(name), state)
        for sub, t in self.source.iter_region(name, stored, region):
            yield sub, t if cast is None else t.to(cast)


def is_universal(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` holds a universal checkpoint (complete or not)."""
    import json

    storage = Storage(url, storage_options=storage_options)
    if not storage.exists(GROUP_META):
        return False
    try:
        doc = json.loads(storage.read(GROUP_META, max_bytes=MAX_JSON_BYTES))
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
