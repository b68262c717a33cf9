"""Engine plugins are found through the entry-point group ``ucp.engines`` (built-ins included)."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, Mapping

from ucp.core._errors import ConvertError

from ._base import Engine

__all__ = ["GROUP", "engines", "get_engine", "detect_engine"]

GROUP = "ucp.engines"
log = logging.getLogger("ucp")
#: Detection order for ``--engine auto``: specific layouts first, third-party plugins after
#: (Megatron's torch_dist directories are DCP directories too: megatron asks first).
_ORDER = ("ucp", "megatron", "dcp", "deepspeed")


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

    Raises:
        ConvertError: no installed engine recognises the path.
    """
    tried, why = [], ""
    for name in engines():
        tried.append(name)
        try:
            engine = get_engine(name)
            found = engine.detect(url, storage_options=storage_options)
        except ConvertError as e:  # an engine that knows the layout but cannot read it says why
            log.warning("ucp: %s", e)
            why += f"; {name}: {e}"
            continue
        if found:
            return engine, found
    raise ConvertError(f"{url}: no engine recognises this checkpoint (tried {', '.join(tried)}){why}; "
                       "pass --engine NAME, or check the path")
