"""Text helpers every command shares: URLs safe to print, byte counts and sizes. No torch."""

from __future__ import annotations

import re

__all__ = ["display_url", "human_bytes", "parse_size"]

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@")


def display_url(url: str) -> str:
    """``url`` without a ``user:password@`` part, safe to print."""
    return _USERINFO.sub(r"\1", str(url))


def human_bytes(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``; None -> ``'-'``."""
    if n is None:
        return "-"
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            break
        size /= 1024
    return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"`` (10**9 units, as Hugging Face counts), ``"512MiB"``, ``"1000"``.

    Raises:
        ValueError: not a size.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
