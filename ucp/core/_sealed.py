"""Sealed JSON metadata documents: each carries the CRC32C of its own content and its
``format_version`` (every format's manifests and group metadata use this codec). No torch."""

from __future__ import annotations

import json
from typing import Any, Collection, Mapping

import crc32c as _crc32c

from ucp.core._errors import ChecksumError, CorruptCheckpointError

__all__ = ["CHECKSUM", "MAX_JSON_BYTES", "seal", "dumps", "load_sealed"]

#: Largest metadata document ucp reads (guards against hostile, oversized JSON).
MAX_JSON_BYTES = 256 * 1024 * 1024
#: Key under which a metadata document carries the CRC32C of its own content (see :func:`seal`).
CHECKSUM = "checksum"


def _content_crc(doc: Mapping[str, Any]) -> str:
    """CRC32C of a document's content without its checksum, in a canonical JSON form that does
    not depend on how the file was formatted (so it survives re-serialisation)."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM}
    raw = json.dumps(body, allow_nan=False, separators=(",", ":"), ensure_ascii=True).encode()
    return f"crc32c:{_crc32c.crc32c(raw):08x}"


def seal(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` with the checksum of its own content under ``"checksum"``.

    Manifests and the universal group metadata are the roots of trust (nothing else records
    their checksum), so a bit flip in a spec, a topology or a hyper-parameter would otherwise
    go unnoticed; :func:`loads` verifies the seal.
    """
    body = {k: v for k, v in doc.items() if k != CHECKSUM}
    return {**body, CHECKSUM: _content_crc(body)}


def dumps(obj: Any, *, indent: int | None = 1) -> bytes:
    """Sealed JSON bytes (key order kept: it is the state order; no NaN) for a metadata dataclass
    or plain dict; ``indent=None``: compact (documents written once per rank of large jobs)."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    separators = (",", ":") if indent is None else None
    return json.dumps(seal(data), allow_nan=False, indent=indent, separators=separators).encode()


def load_sealed(data: bytes, *, what: str, versions: Collection[int]) -> dict[str, Any]:
    """Parses a metadata JSON object and verifies its seal; ``what`` names the file in errors,
    ``versions`` are the ``format_version`` values the caller reads.

    Raises:
        CorruptCheckpointError: too large, not JSON, not an object, or an unsupported version.
        ChecksumError: the content does not match its own checksum.
    """
    if len(data) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"{what}: {len(data)} bytes is larger than any ucp metadata "
                                     f"file may be ({MAX_JSON_BYTES}); the file is not ucp metadata")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{what}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    if CHECKSUM in obj:  # documents written before ucp sealed its metadata carry none
        try:
            crc = _content_crc(obj)
        except (ValueError, RecursionError) as e:  # NaN/inf smuggled in, or absurd nesting
            raise CorruptCheckpointError(f"{what}: content cannot be checksummed ({e}); the file "
                                         "is damaged") from e
        if obj[CHECKSUM] != crc:
            raise ChecksumError(f"{what}: content does not match its own checksum "
                                f"({str(obj[CHECKSUM])[:40]!r}, computed {crc!r}); the file is corrupt "
                                "or was edited by hand; restore it or use another step")
    version = obj.get("format_version")
    if version not in versions:
        known = ", ".join(str(v) for v in versions)
        raise CorruptCheckpointError(f"{what}: format_version {version!r} is not supported by this "
                                     f"ucp (reads version {known}); upgrade ucp")
    return obj
