"""The universal checkpoint as the resharder reads it: arrays read by region, fetching only the
chunks that hold it (:class:`UniversalSource`, an :class:`ucp.resharder.ArraySource`)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ucp.core._errors import CorruptCheckpointError, UcpError
from ucp.core._stfile import dtype_from_name
from ucp.engines._base import ParamInfo
from ucp.core._sealed import MAX_JSON_BYTES
from ucp.resharder._source import ArrayInfo, ArraySource, param_source
from ucp.resharder._zero import Region
from ucp.storage import Storage
from ucp.universal._checkpoint import (GROUP_META, UniversalCheckpoint, _meta_crc, from_numpy,
                                       read_array_meta, to_numpy)
from ucp.universal._shard import ChunkReader, Layout, layout_of

__all__ = ["UniversalSource", "is_universal"]


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
        stored, cast = param_source(info, state)
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

        from ucp.universal._zarr import zarr_store

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


def is_universal(url: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``url`` holds a universal checkpoint (complete or not)."""
    storage = Storage(url, storage_options=storage_options)
    if not storage.exists(GROUP_META):
        return False
    try:
        doc = json.loads(storage.read(GROUP_META, max_bytes=MAX_JSON_BYTES))
        return doc["attributes"]["ucp"]["kind"] == "ucp-universal"
    except (ValueError, KeyError, TypeError):
        return False
