"""ucp: universal checkpointing for distributed PyTorch training.

Every rank saves its own shard asynchronously (:func:`save`), a committed step loads back
bit for bit (:func:`load`), and the universal format lets a run resume on another topology.

The errors and :class:`Topology` are imported with the package; every other name is imported on
first use (PEP 562), so ``import ucp.grammar``, ``ucp --help`` or ``ucp ls`` do not pay for
torch and the engines they do not need.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ucp.core import (
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
    Topology,
)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from . import deepspeed
    from .grammar import Spec, load_spec
    from .native._checkpointer import Checkpointer
    from .native._load import load
    from .native._save import SaveHandle, save
    from .ops._convert import convert
    from .ops._reshard import reshard
    from .universal import UniversalCheckpoint
    from .universal import open_universal as open  # noqa: A001 - the public name is ucp.open

# public name -> (module, attribute)
_LAZY = {
    "save": ("ucp.native._save", "save"),
    "SaveHandle": ("ucp.native._save", "SaveHandle"),
    "load": ("ucp.native._load", "load"),
    "Checkpointer": ("ucp.native._checkpointer", "Checkpointer"),
    "deepspeed": (".deepspeed", None),
    "convert": ("ucp.ops._convert", "convert"),
    "reshard": ("ucp.ops._reshard", "reshard"),
    "open": ("ucp.universal", "open_universal"),
    "UniversalCheckpoint": ("ucp.universal", "UniversalCheckpoint"),
    "Spec": (".grammar", "Spec"),
    "load_spec": (".grammar", "load_spec"),
}


# deprecated top-level names of the DeepSpeed helpers -> their names in ucp.deepspeed (one release)
_DEPRECATED = {"DeepSpeedCheckpointer": "Checkpointer", "load_deepspeed": "load_universal",
               "restore_deepspeed_extras": "restore_extras"}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        warnings.warn(f"ucp.{name} is deprecated; use ucp.deepspeed.{_DEPRECATED[name]}",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(".deepspeed", __name__), _DEPRECATED[name])
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'ucp' has no attribute {name!r}") from None
    value = importlib.import_module(module, __name__)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_DEPRECATED))


__all__ = [
    "save",
    "load",
    "SaveHandle",
    "Checkpointer",
    "deepspeed",
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
