"""Safe, lazy access to the ``torch.save`` files that DeepSpeed writes.

A DeepSpeed checkpoint is a set of pickles in torch's zip format. This module opens one without
running code from it and without reading its tensor bytes:

* the pickle is unpickled by torch's ``weights_only`` unpickler with ``map_location="meta"``, so
  tensors come back as shape/dtype shells, and torch records where each storage's bytes start in
  the file (``UntypedStorage._checkpoint_offset``);
* the only non-torch globals allowed are the few classes DeepSpeed itself pickles, each replaced by
  an inert stand-in defined here (it stores the pickled fields, runs none of DeepSpeed's code, and
  needs no DeepSpeed installed);
* any other global (``os.system``, ``builtins.eval``, ...) makes the file refused with
  :class:`~ucp.UnsafeInputError` before anything is unpickled.

Each tensor becomes a :class:`TensorRef` (file, byte offset, dtype, shape, strides), and
:class:`RangeReader` reads exactly the element range asked for with positional reads, straight into
the output tensor. Memory therefore stays bounded by what a caller asks for, never by file size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pickle
import pickletools
import sys
import threading
import zipfile
from collections import OrderedDict
from typing import Any

import torch

from ucp.core._errors import CheckpointNotFoundError, CorruptCheckpointError, UnsafeInputError
from ucp.storage import open_regular

__all__ = ["TensorRef", "RangeReader", "load_index", "LossScalerState", "FragmentAddress",
           "NamespaceState", "ALLOWED_GLOBALS"]


class _Inert:
    """Base of the stand-ins: keeps the pickled attribute dict, runs no code of the original class.

    The values in ``fields`` were themselves built by the ``weights_only`` unpickler, so they can only
    be tensors, containers, numbers, strings and other allowed objects.
    """

    __slots__ = ("fields",)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state) as pickle allows
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{type(self).__name__}: expected a dict state, got {type(state)}")
        self.fields = dict(state)

    def __getstate__(self) -> dict:
        return self.fields

    def __getattr__(self, name: str) -> Any:
        if name == "fields":
            raise AttributeError(name)
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fields!r})"


class LossScalerState(_Inert):
    """Stand-in for DeepSpeed's ``LossScaler`` / ``DynamicLossScaler`` (``cur_scale``, ...)."""

    __slots__ = ()


class FragmentAddress(_Inert):
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address`` (``numel``, ``start``)."""

    __slots__ = ()


class NamespaceState(_Inert):
    """Stand-in for ``argparse.Namespace``, which Megatron-DeepSpeed saves as ``args``."""

    __slots__ = ()


class _ZeroStage(int):
    """Stand-in for ``ZeroStageEnum``: pickled as ``ZeroStageEnum(value)``; accepts 0..3 only."""

    def __new__(cls, value: Any) -> "_ZeroStage":
        if type(value) is not int or not 0 <= value <= 3:
            raise pickle.UnpicklingError(f"ZeroStageEnum({value!r}) is not a ZeRO stage")
        return super().__new__(cls, value)


#: Pickled global name -> the inert stand-in used for it. Nothing else outside torch is allowed.
ALLOWED_GLOBALS: dict[str, type] = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScalerState,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": LossScalerState,
    "deepspeed.runtime.zero.config.ZeroStageEnum": _ZeroStage,
    "deepspeed.utils.tensor_fragment.fragment_address": FragmentAddress,
    "argparse.Namespace": NamespaceState,
}

# torch keeps its allow-list in a process-wide set; serialise our temporary additions to it.
_LOAD_LOCK = threading.Lock()

# Pickle opcodes that look up or call Python objects (a raw pickle holding any of them is refused).
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one saved tensor's bytes are: a file, the byte offset of its storage, and its view."""

    path: str
    storage_offset_bytes: int  # where the storage's bytes start in the file
    storage_nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # the view's first element within its storage

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def is_flat(self) -> bool:
        """A 1-D view with unit stride (every ZeRO flat partition is one)."""
        return len(self.shape) == 1 and (self.shape[0] <= 1 or self.stride[0] == 1)


def _check_exists(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{path}: file not found; the DeepSpeed checkpoint is incomplete "
                                      "(re-save it, or copy the missing file)") from e


def _raw_pickle_calls_code(path: str) -> bool:
    """Whether a non-zip file is a pickle that would import or call something (never executes it)."""
    with open_regular(path) as f:
        head = f.read(1)
        if head != b"\x80":
            return False
        f.seek(0)
        try:
            return any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(f))
        except Exception:  # a broken pickle stream: not our concern here, it is refused anyway
            return False


def _refuse_foreign_globals(path: str) -> None:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: cannot read the pickle inside this torch file ({e}); "
                                     "it is truncated or corrupt, re-save or re-copy it") from e
    foreign = sorted(set(found) - set(ALLOWED_GLOBALS))
    if foreign:
        raise UnsafeInputError(
            f"{path}: refusing to unpickle: it references {', '.join(foreign)}, which a DeepSpeed "
            "checkpoint does not need and which could run code; if you trust this file, open it with "
            "allow_unsafe_pickle=True")


def _torch_load_meta(path: str, *, allow_unsafe_pickle: bool) -> Any:
    stand_ins = [(cls, name) for name, cls in ALLOWED_GLOBALS.items()]
    try:
        if allow_unsafe_pickle:
            return torch.load(path, map_location="meta", weights_only=False)
        with _LOAD_LOCK, torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="meta", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeInputError(f"{path}: refused by the weights-only unpickler ({str(e).splitlines()[0]}); "
                               "if you trust this file, open it with allow_unsafe_pickle=True") from e
    except (RuntimeError, EOFError, ValueError, KeyError, TypeError, OSError) as e:
        raise CorruptCheckpointError(f"{path}: cannot load this torch file ({str(e).splitlines()[0]}); "
                                     "it is truncated or corrupt, re-save or re-copy it") from e


def _zip_records(path: str) -> dict[int, tuple[str, int, int]]:
    """Each zip member by the file offset of its data: (name, stored size, compression method)."""
    records = {}
    with open_regular(path) as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            f.seek(info.header_offset)
            header = f.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise CorruptCheckpointError(f"{path}: damaged zip entry {info.filename!r}; re-copy the file")
            start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
                int.from_bytes(header[28:30], "little")
            records[start] = (info.filename, info.compress_size, info.compress_type)
    return records


def _to_refs(obj: Any, path: str, records: dict[int, tuple[str, int, int]]) -> Any:
    """Replace every meta tensor in a loaded tree by a :class:`TensorRef`, checked against its zip record."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        start = getattr(storage, "_checkpoint_offset", None)
        if start is None:
            raise CorruptCheckpointError(f"{path}: a tensor has no recorded file offset (not torch's zip "
                                         "format); re-save the checkpoint with a current torch")
        ref = TensorRef(path, int(start), storage.nbytes(), obj.dtype, tuple(obj.shape), tuple(obj.stride()),
                        obj.storage_offset())
        _check_view(ref)
        name, size, method = records.get(ref.storage_offset_bytes, ("?", -1, zipfile.ZIP_STORED))
        if size != ref.storage_nbytes or method != zipfile.ZIP_STORED:
            raise CorruptCheckpointError(
                f"{path}: a {ref.dtype} storage of {ref.storage_nbytes} bytes is stored as {name!r} with "
                f"{size} bytes{' (compressed)' if method != zipfile.ZIP_STORED else ''}; the file is corrupt, "
                "re-copy it")
        return ref
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _to_refs(v, path, records)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _to_refs(v, path, records) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_refs(v, path, records) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, torch.Size):
        return tuple(_to_refs(v, path, records) for v in obj)
    return obj


def _check_view(ref: TensorRef) -> None:
    """A tensor's view must lie inside its storage, and its elements must not overlap (a stride-0
    ``expand``): every element then has bytes of its own in the file, so reading a tensor never
    allocates more than the file holds. DeepSpeed saves contiguous tensors; torch.save of an
    expanded view keeps the view, so a 2 KB file could otherwise ask for any amount of memory."""
    numel = ref.numel
    if numel == 0:
        return
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if ref.offset < 0 or any(s < 0 for s in ref.stride) or (last + 1) * ref.itemsize > ref.storage_nbytes \
            or numel * ref.itemsize > ref.storage_nbytes:
        raise CorruptCheckpointError(
            f"{ref.path}: a {ref.dtype} tensor of shape {list(ref.shape)} (strides {list(ref.stride)}, offset "
            f"{ref.offset}) does not lie inside its {ref.storage_nbytes}-byte storage, or its elements overlap; "
            "the file is damaged or was not written by DeepSpeed (save contiguous tensors)")


def load_index(path: str | os.PathLike, *, allow_unsafe_pickle: bool = False) -> Any:
    """Unpickle a torch file's structure; tensors become :class:`TensorRef`, no tensor bytes are read.

    Args:
        path: a file written by ``torch.save`` (zip format).
        allow_unsafe_pickle: unpickle with the full pickle machinery (runs code from the file and
            needs DeepSpeed importable). Only for files you trust.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        UnsafeInputError: the pickle references anything outside torch's and :data:`ALLOWED_GLOBALS`.
        CorruptCheckpointError: the file is truncated, corrupt or not in torch's zip format.
    """
    path = os.fspath(path)
    _check_exists(path)
    if not zipfile.is_zipfile(path):
        if _raw_pickle_calls_code(path):
            raise UnsafeInputError(f"{path}: a raw pickle that imports or calls objects; refusing to load it "
                                   "(DeepSpeed writes torch's zip format; re-save the file with torch.save)")
        raise CorruptCheckpointError(f"{path}: not a torch zip file (truncated, corrupt, or the legacy "
                                     "format); re-copy it, or re-save it with a current torch")
    if not allow_unsafe_pickle:
        _refuse_foreign_globals(path)
    if sys.byteorder != "little":
        raise CorruptCheckpointError(f"{path}: reading DeepSpeed files needs a little-endian host")
    tree = _torch_load_meta(path, allow_unsafe_pickle=allow_unsafe_pickle)
    try:
        records = _zip_records(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: damaged zip directory ({e}); re-copy the file") from e
    return _to_refs(tree, path, records)


class RangeReader:
    """Reads element ranges of :class:`TensorRef` s with positional reads; keeps a few files open.

    Not thread-safe; use one per thread. A pickled copy (e.g. sent to a worker process) starts with
    no files open.
    """

    def __init__(self, *, max_open: int = 64) -> None:
        self._files: OrderedDict[str, int] = OrderedDict()
        self._max_open = max_open

    def __getstate__(self) -> dict:
        return {"max_open": self._max_open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(max_open=state["max_open"])

    def _fd(self, path: str) -> int:
        fd = self._files.pop(path, None)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError as e:
                raise CheckpointNotFoundError(f"{path}: file disappeared while reading the checkpoint") from e
            while len(self._files) >= self._max_open:
                os.close(self._files.popitem(last=False)[1])
        self._files[path] = fd
        return fd

    def read_into(self, ref: TensorRef, start: int, out: torch.Tensor) -> None:
        """Fill the 1-D contiguous ``out`` with elements ``[start, start + out.numel())`` of a flat ``ref``."""
        count = out.numel()
        in_storage = (ref.offset + start + count) * ref.itemsize <= ref.storage_nbytes
        if (not ref.is_flat() or out.dtype != ref.dtype or start < 0 or start + count > ref.numel
                or not in_storage):
            raise CorruptCheckpointError(
                f"{ref.path}: asked for elements [{start}, {start + count}) of a {ref.dtype} tensor of shape "
                f"{list(ref.shape)}; the checkpoint's metadata and its tensors disagree")
        if count == 0:
            return
        nbytes = count * ref.itemsize
        pos = ref.storage_offset_bytes + (ref.offset + start) * ref.itemsize
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        fd, done = self._fd(ref.path), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], pos + done) if hasattr(os, "preadv") else \
                self._pread_copy(fd, view, done, nbytes, pos)
            if n <= 0:
                raise CorruptCheckpointError(f"{ref.path}: file ends inside a tensor (byte {pos + done}); "
                                             "it is truncated, re-copy it")
            done += n

    @staticmethod
    def _pread_copy(fd: int, view: memoryview, done: int, nbytes: int, pos: int) -> int:
        chunk = os.pread(fd, nbytes - done, pos + done)
        view[done:done + len(chunk)] = chunk
        return len(chunk)

    def read(self, ref: TensorRef) -> torch.Tensor:
        """The whole tensor, with its saved shape, as a fresh contiguous CPU tensor."""
        if ref.is_flat() or ref.numel <= 1 or _is_contiguous(ref):
            out = torch.empty(ref.numel, dtype=ref.dtype)
            flat = dataclasses.replace(ref, shape=(ref.numel,), stride=(1,))
            self.read_into(flat, 0, out)
            return out.view(ref.shape)
        span = 1 + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride) if n > 0)
        base = torch.empty(span, dtype=ref.dtype)
        self.read_into(dataclasses.replace(ref, shape=(span,), stride=(1,)), 0, base)
        return base.as_strided(ref.shape, ref.stride).contiguous()

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])

    def __del__(self) -> None:  # best effort; close() is the real interface
        try:
            self.close()
        except Exception:
            pass


def _is_contiguous(ref: TensorRef) -> bool:
    expected = 1
    for n, s in zip(reversed(ref.shape), reversed(ref.stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True
