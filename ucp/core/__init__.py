"""ucp's leaf vocabulary: errors, :class:`Topology`, file and mesh records, sealed JSON documents.

Every other package builds on these; they import nothing of ucp's and never torch.distributed (the
tree, dtype, fingerprint and coordination helpers beside them import torch, so they are imported by
module, not from here).
"""

from ucp.core._errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    CoordinationTimeoutError,
    ConvertError,
    CorruptCheckpointError,
    SaveError,
    StateError,
    StorageError,
    TopologyError,
    UcpError,
    UcpSpecError,
    UnsafeInputError,
    UnsupportedProtocolError,
    VerificationError,
)
from ucp.core._records import FileRecord, MeshInfo
from ucp.core._topology import AXES, Topology

__all__ = [
    "UcpError", "CheckpointExistsError", "CheckpointNotFoundError", "ChecksumError",
    "CoordinationTimeoutError", "ConvertError", "CorruptCheckpointError", "SaveError", "StateError",
    "StorageError", "TopologyError", "UcpSpecError", "UnsafeInputError", "UnsupportedProtocolError",
    "VerificationError", "Topology", "AXES", "FileRecord", "MeshInfo",
]
