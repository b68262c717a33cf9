"""Megatron's common state: the one ``torch.save``d value beside the sharded tensors.

It holds the optimizer's param groups (and their ``step``); Megatron-LM adds its run's values:
``iteration``, ``checkpoint_version`` and ``args``, an ``argparse.Namespace`` holding Megatron enums
and an ``OptimizerConfig``. Megatron loads it with ``torch.load(weights_only=True)`` after
allow-listing those classes (``megatron.core.safe_globals``); ucp does the same without importing
Megatron: each Megatron class is allow-listed under its name as an inert :class:`Record` that only
keeps what it was built from, so nothing in the file runs.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import pickle
import signal
import types
from typing import Any

import torch

from ucp.core import CorruptCheckpointError, UnsafeInputError

__all__ = ["Record", "load_common"]

#: Megatron classes its own loader allow-lists for the common state (megatron-core 0.19).
MEGATRON_CLASSES = (
    "megatron.core.enums.ModelType",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig",
    "megatron.core.rerun_state_machine.RerunDiagnostic",
    "megatron.core.rerun_state_machine.RerunMode",
    "megatron.core.rerun_state_machine.RerunState",
    "megatron.core.transformer.enums.AttnBackend",
    "megatron.core.transformer.enums.CudaGraphModule",
    "megatron.core.transformer.enums.CudaGraphScope",
    "megatron.core.transformer.enums.InferenceCudaGraphScope",
)
#: Plain containers and enums of the standard library that Megatron-LM's values use.
_STDLIB = [argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath, signal.Signals]


class Record:
    """Stands in for a Megatron class: keeps the arguments (an enum's value) and the state it was
    unpickled with; its class name is the original's. An object unpickled by ``__setstate__``
    alone (a dataclass such as ``OptimizerConfig``) never runs ``__init__``: it has no arguments."""

    args: tuple = ()

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})

    def __repr__(self) -> str:
        fields = [repr(a) for a in self.args]
        fields += [f"{k}={v!r}" for k, v in self.__dict__.items() if k != "args"]
        return f"{type(self).__name__}({', '.join(fields)})"


_STAND_INS = [(type(name.rsplit(".", 1)[1], (Record,), {}), name) for name in MEGATRON_CLASSES]


def load_common(data: bytes, *, where: str) -> Any:
    """The common state from its ``torch.save`` bytes.

    Raises:
        UnsafeInputError: it needs a class beyond tensors, plain values and the allow-list.
        CorruptCheckpointError: the bytes are not a readable ``torch.save`` archive.
    """
    try:
        with torch.serialization.safe_globals([*_STDLIB, *_STAND_INS]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeInputError(f"{where}: the common state needs more than tensors, plain values and "
                               f"Megatron's allow-listed classes ({str(e).splitlines()[0]}); refusing to run "
                               "code from it") from e
    except Exception as e:  # noqa: BLE001 - a damaged archive
        raise CorruptCheckpointError(f"{where}: the common state is a damaged torch.save archive "
                                     f"({type(e).__name__}: {e}); restore the file") from e
