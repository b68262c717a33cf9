"""What an engine plugin provides: detection, and a source checkpoint read parameter by parameter.

A plugin is an object registered under the entry-point group ``ucp.engines`` with a ``name``,
``detect(url, storage_options) -> str | None`` (a one-line description when the path holds this
engine's checkpoint; it raises ``ConvertError`` when the layout is its own but unreadable, saying
why) and ``open(url, *, spec, storage_options, tag) -> SourceCheckpoint``. It may also offer
``near_miss(url, *, storage_options) -> str | None``: why a path that resembles its layout is not one
of its checkpoints, which auto-detection reports when no engine accepts the path.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import torch

from ucp.core._params import ParamInfo, Region
from ucp.core._topology import Topology

__all__ = ["ParamInfo", "SourceCheckpoint", "Engine", "Region", "cut"]

def cut(t: torch.Tensor, region: Region | None) -> torch.Tensor:
    """``region`` of a whole tensor (how readers that read whole tensors answer region reads)."""
    return t if region is None else t[tuple(slice(a, b) for a, b in region)]


@runtime_checkable
class SourceCheckpoint(Protocol):
    """A distributed checkpoint opened for conversion; every read returns a global tensor."""

    engine: str
    step: int | None
    topology: Topology | None

    def names(self) -> list[str]: ...

    def info(self, name: str) -> ParamInfo: ...

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        """State ``state`` of parameter ``name``: the global tensor, or only ``region`` of it
        (a reader that can should then read only the bytes that hold the region)."""

    def buffers(self) -> dict[str, torch.Tensor]: ...

    def param_groups(self) -> list[dict[str, Any]]: ...


@runtime_checkable
class Engine(Protocol):
    name: str

    def detect(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None: ...

    def open(self, url: str, *, spec: Any = None, storage_options: Mapping[str, Any] | None = None,
             tag: str | None = None) -> SourceCheckpoint: ...
