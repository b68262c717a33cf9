"""Where a plan's bytes come from: the one read interface (:class:`ArraySource`) the planner and
the executor use, and its adapter over any engine's :class:`~ucp.engines.SourceCheckpoint`.

A source answers the planning questions (names, info, groups) and the reading ones
(:meth:`ArraySource.array`, :meth:`ArraySource.read`, :meth:`ArraySource.iter_region`); the
executor in :mod:`._read` needs nothing else. The universal checkpoint's source is
:class:`ucp.universal.UniversalSource`; :func:`open_array_source` opens either.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import torch

from ucp.engines._base import ParamInfo, SourceCheckpoint, cut

from ._zero import Region

__all__ = ["ArrayInfo", "ArraySource", "ConvertingSource", "param_source", "open_array_source", "read_many",
           "aliases_of", "extras_of"]


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


def param_source(info: ParamInfo, state: str) -> tuple[str, torch.dtype | None]:
    """Which stored state holds ``state``: an fp32 model keeps its weights once, as ``fp32``."""
    if state == "param" and "param" not in info.states and "fp32" in info.states:
        return "fp32", info.dtype
    return state, None


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
        from ucp.core._tree import jsonable

        return jsonable([dict(g) for g in self._groups])

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
        stored, cast = param_source(self.info(name), state)
        t = self.source.read(name, stored, region)
        return t if cast is None else t.to(cast)

    def iter_region(self, name: str, state: str | None, region: Region) -> Iterator[tuple[Region, torch.Tensor]]:
        if state is None or not self.partial:
            yield region, self.read(name, state, region)
            return
        stored, cast = param_source(self.info(name), state)
        for sub, t in self.source.iter_region(name, stored, region):
            yield sub, t if cast is None else t.to(cast)


def read_many(source: ArraySource, keys: Sequence[tuple[str, str | None]]) -> list[ArrayInfo]:
    """:meth:`ArraySource.array` of every key (array metadata, read in parallel)."""
    storage = getattr(getattr(source, "ckpt", None), "storage", None)
    if storage is None or not source.concurrent:
        return [source.array(n, s) for n, s in keys]
    return storage.map(lambda k: source.array(*k), keys)


def open_array_source(src: Any, *, engine: str = "auto", spec: Any = None, tag: str | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> ArraySource:
    """An :class:`ArraySource` for ``src``: an ArraySource, a UniversalCheckpoint, a
    SourceCheckpoint, or a URL of a universal checkpoint or of any checkpoint ``ucp convert``
    reads (``engine``/``spec``/``tag`` then pick and read the source, as for convert).
    """
    if isinstance(src, ArraySource):
        return src
    if isinstance(src, SourceCheckpoint):
        return ConvertingSource(src, getattr(src, "url", type(src).__name__))
    from ucp.universal import UniversalCheckpoint, UniversalSource, is_universal, open_universal

    if isinstance(src, UniversalCheckpoint):
        return UniversalSource(src)
    url = str(src)
    if engine in ("auto", "universal") and is_universal(url, storage_options):
        return UniversalSource(open_universal(url, storage_options=storage_options))
    from ucp.engines._open import open_source

    source, _found = open_source(url, engine=engine, spec=spec, tag=tag,
                                 storage_options=storage_options)
    return ConvertingSource(source, url)


def aliases_of(source: ArraySource) -> dict[str, str]:
    """Tied parameters (alias -> stored name), from a universal or an on-the-fly source."""
    ckpt = getattr(source, "ckpt", None)
    if ckpt is not None:
        return dict(ckpt.aliases)
    inner = getattr(source, "source", None)  # an engine reader: DeepSpeed's calls them shared_params
    for attr in ("aliases", "shared_params"):
        fn = getattr(inner, attr, None)
        if callable(fn):
            return dict(fn())
    return {}


def extras_of(source: ArraySource) -> dict[str, Any]:
    """The source's other training state (a universal checkpoint's ``extras``, an engine reader's
    ``extras()``: schedulers, train state), or {}."""
    ckpt = getattr(source, "ckpt", None)
    extras = getattr(ckpt, "extras", None) if ckpt is not None else None
    if extras is None:
        fn = getattr(getattr(source, "source", None), "extras", None)
        extras = fn() if callable(fn) else None
    return dict(extras or {})
