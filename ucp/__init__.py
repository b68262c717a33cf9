"""ucp: universal checkpointing for distributed PyTorch training.

Every rank saves its own shard asynchronously (:func:`save`), a committed step loads back
bit for bit (:func:`load`), and the universal format lets a run resume on another topology.
"""

from ._errors import (
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
from ._checkpointer import Checkpointer
from ._convert import convert
from ._deepspeed_hook import DeepSpeedCheckpointer, load_deepspeed, restore_deepspeed_extras
from ._load import load
from ._reshard import reshard
from ._save import SaveHandle, save
from ._topology import Topology
from ._universal import UniversalCheckpoint
from ._universal import open_universal as open  # noqa: A001 - the public name is ucp.open
from .grammar import Spec, load_spec

__all__ = [
    "save",
    "load",
    "SaveHandle",
    "Checkpointer",
    "DeepSpeedCheckpointer",
    "load_deepspeed",
    "restore_deepspeed_extras",
    "convert",
    "reshard",
    "open",
    "UniversalCheckpoint",
    "Topology",
    "Spec",
    "load_spec",
    "UcpError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ChecksumError",
    "CoordinationTimeoutError",
    "ConvertError",
    "CorruptCheckpointError",
    "SaveError",
    "StateError",
    "StorageError",
    "TopologyError",
    "UcpSpecError",
    "UnsafeInputError",
    "UnsupportedProtocolError",
    "VerificationError",
]
