"""The universal checkpoint as the resharder reads it: arrays read by region, fetching only the
chunks that hold it (:class:`UniversalSource`, an :class:`ucp.resharder.ArraySource`)."""

from __future__ import annotations

import itertools
import json
from typing import Any, Iterator, Mapping

import torch

from ucp.core._sealed import MAX_JSON_BYTES
from ucp.core._params import ParamInfo
from ucp.resharder._source import ArrayInfo, ArraySource
from ucp.resharder._zero import Region
from ucp.storage import Storage
from ucp.universal._checkpoint import GROUP_META, OpenedArray, UniversalCheckpoint, from_numpy

__all__ = ["UniversalSource", "is_universal"]


class UniversalSource(ArraySource):
    """A universal checkpoint as the resharder reads it: region reads fetch only the chunks that
    hold them, through the checkpoint's own reader (:meth:`UniversalCheckpoint.read_array`)."""

    def __init__(self, ckpt: UniversalCheckpoint) -> None:
        self.ckpt, self.url = ckpt, ckpt.url
        self.step, self.topology = ckpt.step, ckpt.topology
        meta = ckpt.metadata
        self.spec_text, self.spec_constants = meta.get("spec"), meta.get("spec_constants")

    def names(self) -> list[str]:
        return self.ckpt.names()

    def info(self, name: str) -> ParamInfo:
        return self.ckpt.info(name)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.ckpt.param_groups

    def buffer_names(self) -> list[str]:
        return self.ckpt.buffer_names()

    def _open(self, name: str, state: str | None) -> tuple[OpenedArray, torch.dtype | None]:
        return self.ckpt.state_array(name, state)

    def array(self, name: str, state: str | None) -> ArrayInfo:
        a, cast = self._open(name, state)
        return ArrayInfo(a.shape, cast or a.dtype, a.chunks, a.np_dtype.itemsize)

    def read(self, name: str, state: str | None, region: Region | None) -> torch.Tensor:
        a, cast = self._open(name, state)
        t = self.ckpt.read_array(a, None if region is None else [slice(lo, hi) for lo, hi in region])
        return t if cast is None else t.to(cast)

    def iter_region(self, name: str, state: str | None, region: Region) -> Iterator[tuple[Region, torch.Tensor]]:
        a, cast = self._open(name, state)
        if a.layout is None or any(lo % c or (hi % c and hi != s) for (lo, hi), c, s in
                                   zip(region, a.chunks, a.shape)):
            yield region, self.read(name, state, region)
            return
        ranges = [range(lo // c, -(-hi // c)) for (lo, hi), c in zip(region, a.chunks)]
        for idx in itertools.product(*ranges):
            sub = tuple((i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, a.chunks, a.shape))
            t = from_numpy(self.ckpt.read_chunk(a, idx), a.dtype)
            yield sub, t if cast is None else t.to(cast)


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
