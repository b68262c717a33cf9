"""The error hierarchy.

Every error ucp raises on purpose derives from :class:`UcpError`; each subclass also inherits the
builtin a caller would naturally catch (``FileNotFoundError``, ``ValueError``, ...), so code that
does not know ucp still handles them sensibly.
"""

from __future__ import annotations

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
    "UnsafeInputError",
]


class UcpError(Exception):
    """Base class of every error ucp raises on purpose."""


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


class UnsafeInputError(UcpError, ValueError):
    """An input tried to escape the checkpoint root or to run code while being read."""
