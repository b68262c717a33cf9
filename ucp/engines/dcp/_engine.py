"""The ``dcp`` engine: torch.distributed.checkpoint directories as a conversion source."""

from __future__ import annotations

from typing import Any, Mapping

from ucp.storage import Storage

from .._near import dcp_near_miss
from ._reader import DcpCheckpoint, detect
from ._roots import roots_near_miss

__all__ = ["ENGINE", "DcpEngine"]


class DcpEngine:
    """Detects (``.metadata`` + ``*.distcp``, or torchtitan / accelerate roots of them) and opens DCP
    checkpoints; DCP records every chunk's box, so no spec is needed, except the constant
    ``head_dim`` for torchtitan's fused attention (``tag``: torchtitan's step)."""

    name = "dcp"

    def detect(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        return detect(url, storage_options=storage_options)

    def near_miss(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        return (dcp_near_miss(url, storage_options=storage_options)
                or roots_near_miss(Storage(url, storage_options=storage_options)))

    def open(self, url: str, *, spec: Any = None, storage_options: Mapping[str, Any] | None = None,
             tag: str | None = None) -> DcpCheckpoint:
        constants = getattr(spec, "constants", None) or {}
        return DcpCheckpoint(url, storage_options=storage_options, tag=tag,
                             head_dim=constants.get("head_dim"))


ENGINE = DcpEngine()
