"""Hugging Face models as a source engine (``hf``): a safetensors model starts a distributed run.

``ucp reshard hf_model/ out --to tp=2,dp=2 --engine dcp|ucp|megatron`` lays a pretrained model out for any
topology (with a spec for tp/pp cuts); ``ucp convert hf_model/ universal/`` makes it a universal
checkpoint. Weights only: the optimizer starts empty.
"""

from __future__ import annotations

from typing import Any, Mapping

from ucp.core._errors import ConvertError
from ucp.engines.hf._files import INDEX, SafetensorsFiles
from ucp.storage import Storage

__all__ = ["ENGINE", "HfEngine", "SafetensorsFiles"]


class HfEngine:
    """Detects and opens safetensors models (a file, or a folder of ``*.safetensors``)."""

    name = "hf"

    def detect(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        if url.rstrip("/").endswith(".safetensors"):
            return "a safetensors file"
        listing = Storage(url, storage_options=storage_options).list("")
        if any(n.startswith("rank-") for n in listing):  # a native step directory: ucp's
            return None
        files = [n for n in listing if n.endswith(".safetensors")]
        if INDEX in listing or files:
            return f"Hugging Face safetensors model: {len(files)} file(s)"
        return None

    def open(self, url: str, *, spec: Any = None, storage_options: Mapping[str, Any] | None = None,
             tag: str | None = None) -> SafetensorsFiles:
        if tag is not None:
            raise ConvertError(f"{url}: a safetensors model has no steps or tags (got tag {tag!r})")
        return SafetensorsFiles(url, storage_options=storage_options)


ENGINE = HfEngine()
