"""Engine plugins: readers and writers for training engines' own checkpoint formats.

Plugins register under the entry-point group ``ucp.engines``; the built-ins do the same.
"""

from ._base import Engine, ParamInfo, SourceCheckpoint
from ._registry import GROUP, detect_engine, engines, get_engine

__all__ = ["Engine", "ParamInfo", "SourceCheckpoint", "GROUP", "engines", "get_engine", "detect_engine"]
