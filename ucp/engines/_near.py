"""Why a path that resembles an engine's layout is not one of its checkpoints ("near misses").

Each function looks at file names only (one listing, no file is opened) and returns a one-line
reason with its fix, or None when the path does not resemble that layout at all. The registry
reports the closest engine's reason when no engine accepts a path (``detect_engine``).
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from ucp.storage import Storage

__all__ = ["dcp_near_miss", "native_near_miss", "deepspeed_near_miss"]

_RANK_FILE = re.compile(r"rank-\d+\.(json|safetensors)")
_STEP_DIR = re.compile(r"step-\d{8}")


def _listing(url: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    try:
        return Storage(url, storage_options=storage_options).list("")
    except Exception:  # noqa: BLE001 - nothing listable resembles anything
        return []


def dcp_near_miss(url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """DCP data files without ``.metadata`` (an unfinished save), or metadata without data."""
    names = _listing(url, storage_options)
    data = [n for n in names if n.endswith(".distcp")]
    meta = [n for n in names if n.endswith(".metadata")]
    if data and not meta:
        return (f"{len(data)} .distcp data file(s) but no .metadata: the save did not finish (DCP writes "
                ".metadata last); use a checkpoint whose save completed")
    if meta and not data:
        return f"{meta[0]} but no .distcp data files: copy the data files next to it"
    return None


def native_near_miss(url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """ucp rank files without a committed manifest (a step that never finished saving)."""
    names = _listing(url, storage_options)
    ranks = [n for n in names if _RANK_FILE.fullmatch(n)]
    if ranks and "manifest.json" not in names:
        return (f"{len(ranks)} ucp rank file(s) but no manifest.json: this step was never committed (a rank "
                "failed or the job stopped while saving); use an earlier, committed step")
    return None


def deepspeed_near_miss(url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """A DeepSpeed ``latest`` file whose tag directory is missing."""
    if "://" in url and not url.startswith("file://"):
        return None
    root = url.removeprefix("file://")
    latest = os.path.join(root, "latest")
    if not os.path.isfile(latest):
        return None
    try:
        with open(latest, encoding="utf-8", errors="replace") as f:
            tag = f.read(256).strip()
    except OSError:
        return None
    if _STEP_DIR.fullmatch(tag):  # ucp's own 'latest' names a step directory
        return None
    if not os.path.isdir(os.path.join(root, tag)):
        return (f"'latest' names the tag {tag[:80]!r}, which is not a directory here; copy that tag "
                "directory too, or pass --tag with one that is present")
    return None
