"""The error hierarchy.

Every error ucp raises on purpose derives from :class:`UcpError`; each subclass also inherits the
builtin a caller would naturally catch (``FileNotFoundError``, ``ValueError``, ...), so code that
does not know ucp still handles them sensibly.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = [
    "UcpError",
    "CheckpointNotFoundError",
    "CheckpointExistsError",
    "ChecksumError",
    "CorruptCheckpointError",
    "StateError",
    "TopologyError",
    "UcpSpecError",
    "StorageError",
    "UnsupportedProtocolError",
    "SaveError",
    "CoordinationTimeoutError",
    "ConvertError",
    "VerificationError",
    "UnsafeInputError",
]


# Credentials a URL can carry: "scheme://user:password@host" or "scheme://token@host", and
# signature/token query parameters (presigned S3 URLs, Azure SAS). Never printed by ucp.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s\"'<>]+@")
_SECRET_PARAM = re.compile(r"([?&](?:sig|signature|token|access_token|key|secret|password|x-amz-signature|"
                           r"x-amz-security-token|x-amz-credential)=)[^&\s\"'<>]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials that URLs in it may carry replaced by ``***``."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


class UcpError(Exception):
    """Base class of every error ucp raises on purpose. Its message never holds a credential
    embedded in a URL (see :func:`redact`)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))


class _RedactFilter(logging.Filter):
    """Removes URL credentials from ucp's log records (messages and their arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(redact(str(a)) if isinstance(a, (str, BaseException)) else a
                                for a in record.args)
        return True


for _name in ("ucp", "ucp.storage"):  # every logger ucp writes to
    logging.getLogger(_name).addFilter(_RedactFilter())


class CheckpointNotFoundError(UcpError, FileNotFoundError):
    """No committed checkpoint (or no requested step / file) exists at the location."""


class CheckpointExistsError(UcpError, FileExistsError):
    """A committed checkpoint would be overwritten without ``overwrite=True``."""


class ChecksumError(UcpError, ValueError):
    """A file's bytes do not match the size or checksum recorded when it was written."""


class CorruptCheckpointError(UcpError, ValueError):
    """Checkpoint metadata is malformed, inconsistent or of an unsupported format version."""


class StateError(UcpError, TypeError):
    """A value in the state to save cannot be saved (names the key path)."""


class TopologyError(UcpError, ValueError):
    """A topology string or rank is invalid, or a topology cannot hold a model."""


class UcpSpecError(UcpError, ValueError):
    """A UCL spec is malformed or does not fit a checkpoint (carries line/column when known)."""


class StorageError(UcpError, OSError):
    """A storage operation failed after its retries were exhausted."""


class UnsupportedProtocolError(UcpError, ImportError):
    """A URL's protocol needs an fsspec implementation that is not installed."""


class SaveError(UcpError, RuntimeError):
    """An asynchronous save failed on one or more ranks; nothing was committed."""


class CoordinationTimeoutError(SaveError, TimeoutError):
    """A rank did not reach a coordination point in time (it may have died)."""


class ConvertError(UcpError, RuntimeError):
    """A distributed checkpoint could not be converted (names the file or parameter)."""


class VerificationError(ConvertError):
    """A written checkpoint does not hold what its source holds (names the parameter and state)."""


class UnsafeInputError(UcpError, ValueError):
    """An input tried to escape the checkpoint root or to run code while being read."""
