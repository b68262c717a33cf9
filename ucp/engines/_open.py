"""Opening any engine's checkpoint: by name, or by asking every installed engine (auto-detect)."""

from __future__ import annotations

from typing import Any, Mapping

from ucp.core._errors import CheckpointNotFoundError, ConvertError
from ucp.core._text import display_url

from ._base import SourceCheckpoint
from ._registry import detect_engine, get_engine

__all__ = ["open_source", "spec_of"]


def spec_of(spec: Any, constants: Mapping[str, int] | None = None) -> Any:
    """A Spec from a Spec, a bundled spec's name, a path or UCL text (the one resolver,
    :func:`ucp.grammar.load_spec`); None for no spec."""
    if spec is None:
        return None
    from ucp.grammar import load_spec

    return load_spec(spec, constants=constants)


def layout_spec(spec: Any) -> Any:
    """``spec`` when it lays parameters out (a ``param`` or ``default`` rule), else None: a spec of
    constants only (torchtitan's ``head_dim = N``) tells a reader something but covers no parameter,
    so coverage checks and stored specs leave it out."""
    if spec is None or (not spec.rules and spec.default is None):
        return None
    return spec


def open_source(src: str, *, engine: str = "auto", spec: Any = None, tag: str | None = None,
                storage_options: Mapping[str, Any] | None = None) -> tuple[SourceCheckpoint, str]:
    """Opens a distributed checkpoint through its engine plugin; returns it and what was found."""
    if engine == "auto":
        try:
            eng, found = detect_engine(src, storage_options=storage_options)
        except ConvertError as e:
            _require_exists(src, storage_options, e)
            raise
    else:
        eng = get_engine(engine)
        found = eng.detect(src, storage_options=storage_options) or f"{engine} checkpoint (not detected)"
    return eng.open(src, spec=spec_of(spec), storage_options=storage_options, tag=tag), f"{eng.name}: {found}"


def _require_exists(src: str, storage_options: Mapping[str, Any] | None, cause: Exception) -> None:
    """Says that ``src`` does not exist, rather than that no engine recognises it."""
    from ucp.storage import Storage

    storage = Storage(src, storage_options=storage_options)
    if not storage.list("") and not storage.exists(""):
        raise CheckpointNotFoundError(f"{display_url(src)}: no such file or directory; check "
                                      "the path") from cause
