"""Engine plugins are found through the entry-point group ``ucp.engines`` (built-ins included)."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, Mapping

from ucp.core._errors import ConvertError

from ._base import Engine

__all__ = ["GROUP", "engines", "get_engine", "detect_engine", "UnrecognisedError"]

GROUP = "ucp.engines"
log = logging.getLogger("ucp")
#: Detection order for ``--engine auto``: specific layouts first, third-party plugins after
#: (Megatron's torch_dist directories are DCP directories too: megatron asks first; a folder of
#: safetensors files is a Hugging Face model only when no other engine claims it).
_ORDER = ("ucp", "megatron", "dcp", "deepspeed", "hf")


class UnrecognisedError(ConvertError):
    """No engine accepts a path; ``closest`` is the nearest engine's reason (``"name: why"``), if any."""

    def __init__(self, message: str, *, closest: str | None = None) -> None:
        super().__init__(message)
        self.closest = closest


def engines() -> dict[str, Any]:
    """Entry points of every installed engine plugin, by name (not yet imported)."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    return dict(sorted(found.items(), key=lambda kv: (_ORDER.index(kv[0]) if kv[0] in _ORDER
                                                       else len(_ORDER), kv[0])))


def get_engine(name: str) -> Engine:
    """The engine plugin called ``name``.

    Raises:
        ConvertError: no such plugin (lists the installed ones), or it fails to import.
    """
    eps = engines()
    if name not in eps:
        raise ConvertError(f"no engine plugin {name!r}; installed: {', '.join(eps) or 'none'} "
                           f"(plugins register under the entry-point group {GROUP!r})")
    try:
        engine = eps[name].load()
    except Exception as e:  # noqa: BLE001 - a broken plugin is named, not crashed on
        raise ConvertError(f"engine plugin {name!r} ({eps[name].value}) failed to load: {e}") from e
    return engine() if isinstance(engine, type) else engine


def detect_engine(url: str, *, storage_options: Mapping[str, Any] | None = None) -> tuple[Engine, str]:
    """The first engine that recognises ``url``, and what it says it found.

    An engine's ``detect`` raises :class:`ConvertError` when the path holds its layout but it
    cannot read it; an engine may also offer ``near_miss(url, *, storage_options) -> str | None``
    saying why a path that resembles its layout is not one. When no engine accepts the path,
    the error names the engine that came closest (a refusal first, then a near miss) and why.

    Raises:
        UnrecognisedError: no installed engine recognises the path (a ConvertError).
    """
    tried, refusals, misses = [], [], []
    for name in engines():
        tried.append(name)
        try:
            engine = get_engine(name)
            found = engine.detect(url, storage_options=storage_options)
        except ConvertError as e:  # an engine that knows the layout but cannot read it says why
            log.warning("ucp: %s", e)
            refusals.append(f"{name}: {e}")
            continue
        if found:
            return engine, found
        miss = _near_miss(engine, url, storage_options)
        if miss:
            misses.append(f"{name}: {miss}")
    reasons = refusals + misses
    why = f"; closest: {reasons[0]}" + "".join(f"; also {r}" for r in reasons[1:]) if reasons else ""
    raise UnrecognisedError(f"{url}: no engine recognises this checkpoint (tried {', '.join(tried)}){why}; "
                            "pass --engine NAME, or check the path", closest=reasons[0] if reasons else None)


def _near_miss(engine: Engine, url: str, storage_options: Mapping[str, Any] | None) -> str | None:
    """The engine's own word on why ``url`` resembles its layout but is not one (None: it does not)."""
    near_miss = getattr(engine, "near_miss", None)
    if near_miss is None:
        return None
    try:
        return near_miss(url, storage_options=storage_options)
    except Exception as e:  # noqa: BLE001 - an explanation must never hide the refusal it explains
        log.debug("ucp: %s near_miss failed: %s", getattr(engine, "name", engine), e)
        return None
