"""Records shared by every format: a written file, a device mesh, and the checks of JSON fields.

A leaf module (no torch): :mod:`ucp.storage` and every format's metadata build on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ucp.core._errors import CorruptCheckpointError

__all__ = ["FileRecord", "MeshInfo", "field", "ints"]


def field(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``obj[key]``, checked to be a ``kind`` (a bool is not an int); ``what`` names the document."""
    try:
        value = obj[key]
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{what}: missing field {key!r}") from e
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CorruptCheckpointError(f"{what}: field {key!r} has type {type(value).__name__}")
    return value


def ints(values: Any, what: str, *, minimum: int = 0) -> tuple[int, ...]:
    """``values`` as a tuple, checked to be a list of integers >= ``minimum``."""
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
        raise CorruptCheckpointError(f"{what}: expected a list of integers >= {minimum}")
    return tuple(values)


@dataclasses.dataclass(frozen=True)
class FileRecord:
    """A written file: its size in bytes and CRC32C checksum."""

    size: int
    crc32c: int

    def to_dict(self) -> dict[str, int]:
        return {"size": self.size, "crc32c": self.crc32c}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "file record") -> FileRecord:
        return cls(size=field(d, "size", int, what), crc32c=field(d, "crc32c", int, what))


@dataclasses.dataclass(frozen=True)
class MeshInfo:
    """A DeviceMesh as saved: its shape, the global rank at every position, and dim names."""

    shape: tuple[int, ...]
    ranks: tuple[int, ...]
    dim_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "ranks": list(self.ranks),
                "dim_names": None if self.dim_names is None else list(self.dim_names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "mesh") -> MeshInfo:
        names = d.get("dim_names") if isinstance(d, Mapping) else None
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise CorruptCheckpointError(f"{what}: dim_names must be a list of strings")
        shape = ints(field(d, "shape", list, what), what, minimum=1)
        ranks = ints(field(d, "ranks", list, what), what)
        size = 1
        for s in shape:
            size *= s
        if len(ranks) != size or (names is not None and len(names) != len(shape)):
            raise CorruptCheckpointError(f"{what}: shape {list(shape)} does not fit its ranks/names")
        return cls(shape=shape, ranks=ranks, dim_names=None if names is None else tuple(names))
