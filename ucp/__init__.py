"""ucp: universal checkpointing for distributed PyTorch training.

Every rank saves its own shard asynchronously (:func:`save`), a committed step loads back
bit for bit (:func:`load`), and the universal format lets a run resume on another topology.

The errors and :class:`Topology` are imported with the package; every other name is imported on
first use (PEP 562), so ``import ucp.grammar``, ``ucp --help`` or ``ucp ls`` do not pay for
torch and the engines they do not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
from ._topology import Topology

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from ._checkpointer import Checkpointer
    from ._convert import convert
    from ._deepspeed_hook import DeepSpeedCheckpointer, load_deepspeed, restore_deepspeed_extras
    from ._load import load
    from ._reshard import reshard
    from ._save import SaveHandle, save
    from ._universal import UniversalCheckpoint
    from ._universal import open_universal as open  # noqa: A001 - the public name is ucp.open
    from .grammar import Spec, load_spec

# public name -> (module, attribute)
_LAZY = {
    "save": ("._save", "save"),
    "SaveHandle": ("._save", "SaveHandle"),
    "load": ("._load", "load"),
    "Checkpointer": ("._checkpointer", "Checkpointer"),
    "DeepSpeedCheckpointer": ("._deepspeed_hook", "DeepSpeedCheckpointer"),
    "load_deepspeed": ("._deepspeed_hook", "load_deepspeed"),
    "restore_deepspeed_extras": ("._deepspeed_hook", "restore_deepspeed_extras"),
    "convert": ("._convert", "convert"),
    "reshard": ("._reshard", "reshard"),
    "open": ("._universal", "open_universal"),
    "UniversalCheckpoint": ("._universal", "UniversalCheckpoint"),
    "Spec": (".grammar", "Spec"),
    "load_spec": (".grammar", "load_spec"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ucp' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
