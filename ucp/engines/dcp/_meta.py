"""Read the ``.metadata`` file of a torch.distributed.checkpoint (DCP) directory without running code.

DCP pickles one ``Metadata`` object (see ``docs/formats/dcp.md``). This module unpickles it with an
unpickler that resolves only a short allow-list of globals, each to a stand-in defined here that just
stores attributes (never torch's own classes: nothing in the file reaches a constructor with side
effects), then checks every field and returns plain frozen dataclasses:

* :class:`DcpMetadata` - every saved value by its flattened key, plus its path in the saved state dict;
* :class:`TensorEntry` - a tensor's global shape, dtype and chunks; :class:`Chunk` - one chunk's
  region of the global tensor and where its ``torch.save`` blob lies (file, byte offset, length);
* :class:`ObjectEntry` - a non-tensor value (a ``torch.save`` blob of a Python object).
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any, Callable

import torch

from ucp.core._errors import CorruptCheckpointError, UnsafeInputError

__all__ = ["Chunk", "TensorEntry", "ObjectEntry", "DcpMetadata", "parse_metadata", "merge_metadata",
           "unpickle_metadata"]

KeyPath = tuple["str | int", ...]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One saved piece of a tensor: its region and where its bytes are.

    Attributes:
        offsets, sizes: the region of the global tensor (one entry per dim).
        file: the file holding it, relative to the checkpoint directory.
        start, length: the byte range of its ``torch.save`` blob in ``file``.
        transforms: stream transforms applied on write (e.g. ``"stream.zstd/1"``), outermost last.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    key: str
    path: KeyPath
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: tuple[Chunk, ...]


@dataclasses.dataclass(frozen=True)
class ObjectEntry:
    key: str
    path: KeyPath
    file: str
    start: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class DcpMetadata:
    """What a DCP ``.metadata`` file says, checked.

    Attributes:
        version: DCP's format version string (``"1.0.0"`` in torch 2.13; None before 2.5).
        tensors, objects: saved values by flattened key (``"model.layers.0.weight"``).
        files: every data file the entries point into, sorted.
    """

    version: str | None
    tensors: dict[str, TensorEntry]
    objects: dict[str, ObjectEntry]

    @property
    def files(self) -> tuple[str, ...]:
        names = {c.file for t in self.tensors.values() for c in t.chunks}
        names.update(o.file for o in self.objects.values())
        return tuple(sorted(names))


# -- restricted unpickling ---------------------------------------------------------------------
class _Record:
    """Stand-in for a DCP metadata dataclass: keeps the pickled attributes, runs nothing."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) form
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state {type(state).__name__} for {type(self).__name__}")
        self.__dict__.update({str(k): v for k, v in state.items()})


class _Metadata(_Record): ...
class _TensorStorageMetadata(_Record): ...
class _BytesStorageMetadata(_Record): ...
class _ChunkStorageMetadata(_Record): ...
class _StorageMeta(_Record): ...
class _MetadataIndex(_Record): ...
class _StorageInfo(_Record): ...
class _Plan(_Record): ...  # a rank's SavePlan / WriteItem / TensorWriteData: never read


class _TensorProperties(_Record):
    """torch pickles TensorProperties as a tuple whose first item is the dtype (older: a dict)."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state and not isinstance(state[-1], dict):
            self.__dict__["dtype"] = state[0]
        else:
            super().__setstate__(state)


def _size(*args: Any) -> tuple[Any, ...]:
    if len(args) != 1:
        raise pickle.UnpicklingError("torch.Size takes one argument")
    return tuple(args[0])


def _opaque(*args: Any) -> str:
    """Values the reader never uses (paths, layouts, memory-format codes) become inert strings."""
    return "/".join(map(str, args))


_DCP = "torch.distributed.checkpoint"
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    (f"{_DCP}.metadata", "Metadata"): _Metadata,
    (f"{_DCP}.metadata", "TensorStorageMetadata"): _TensorStorageMetadata,
    (f"{_DCP}.metadata", "BytesStorageMetadata"): _BytesStorageMetadata,
    (f"{_DCP}.metadata", "ChunkStorageMetadata"): _ChunkStorageMetadata,
    (f"{_DCP}.metadata", "TensorProperties"): _TensorProperties,
    (f"{_DCP}.metadata", "StorageMeta"): _StorageMeta,
    (f"{_DCP}.metadata", "MetadataIndex"): _MetadataIndex,
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"): _opaque,
    (f"{_DCP}.filesystem", "_StorageInfo"): _StorageInfo,
    # Megatron-core keeps every rank's save plan in the metadata (``all_local_plans``)
    **{(f"{_DCP}.planner", cls): _Plan for cls in ("SavePlan", "WriteItem", "TensorWriteData")},
    (f"{_DCP}.planner", "WriteItemType"): _opaque,
    ("torch", "Size"): _size,
    ("torch.serialization", "_get_layout"): _opaque,
    **{(mod, cls): _opaque for mod in ("pathlib", "pathlib._local")
       for cls in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused(f"persistent id {pid!r}")


class _Refused(pickle.UnpicklingError):
    pass


def unpickle_metadata(data: bytes, *, where: str) -> Any:
    """Unpickles DCP metadata bytes, resolving only the allow-listed globals.

    Raises:
        UnsafeInputError: the pickle names anything outside the allow-list (it could run code).
        CorruptCheckpointError: the bytes are not a readable pickle.
    """
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise UnsafeInputError(f"{where}: refusing to unpickle {e}: a DCP .metadata file holds only "
                               "torch.distributed.checkpoint metadata classes, torch.Size and dtypes; "
                               "this file may be hostile (or from an unsupported writer)") from e
    except Exception as e:  # noqa: BLE001 - any malformed pickle is reported the same way
        raise CorruptCheckpointError(f"{where}: not a readable DCP metadata pickle ({type(e).__name__}: "
                                     f"{e}); the file is truncated or was not written by "
                                     "torch.distributed.checkpoint.save") from e


# -- checking ----------------------------------------------------------------------------------
def _ints(value: Any, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                      and v >= 0 for v in value):
        raise CorruptCheckpointError(f"{where}: {what} is {value!r}, expected non-negative integers")
    return tuple(value)


def _path_of(key: str, planner_data: Any) -> KeyPath:
    """The key's path in the saved (nested) state dict, from DCP's flatten mapping when present."""
    if isinstance(planner_data, dict):
        path = planner_data.get(key)
        if isinstance(path, (tuple, list)) and path and all(isinstance(p, (str, int)) for p in path) \
                and ".".join(map(str, path)) == key:
            return tuple(path)
    head, _, rest = key.partition(".")
    return (head, rest) if rest else (head,)


def _storage_index(storage_data: Any, where: str) -> dict[tuple[str, tuple[int, ...] | None], tuple]:
    if not isinstance(storage_data, dict):
        raise CorruptCheckpointError(f"{where}: storage_data is {type(storage_data).__name__}, expected a "
                                     "dict (written by a storage writer other than FileSystemWriter?)")
    index: dict[tuple[str, tuple[int, ...] | None], tuple] = {}
    for k, v in storage_data.items():
        fqn = getattr(k, "fqn", None)
        if not isinstance(k, _MetadataIndex) or not isinstance(fqn, str) or not isinstance(v, _StorageInfo):
            raise CorruptCheckpointError(f"{where}: storage_data maps {k!r} to {v!r}; expected "
                                         "MetadataIndex -> _StorageInfo (FileSystemWriter's format)")
        offset = getattr(k, "offset", None)
        offset = None if offset is None else _ints(offset, f"offset of {fqn!r}", where)
        rel, start, length = (getattr(v, a, None) for a in ("relative_path", "offset", "length"))
        transforms = getattr(v, "transform_descriptors", None) or ()
        if not isinstance(rel, str) or not rel or not isinstance(transforms, (tuple, list)) \
                or not all(isinstance(t, str) for t in transforms):
            raise CorruptCheckpointError(f"{where}: bad storage record for {fqn!r}: {v.__dict__!r}")
        if "/" in rel or "\\" in rel or rel in (".", "..") or "\0" in rel:
            raise UnsafeInputError(f"{where}: item {fqn!r} points at {rel!r}, outside the checkpoint "
                                   "directory; DCP data files are plain names inside it")
        _ints((start, length), f"byte range of {fqn!r} in {rel!r}", where)
        index[(fqn, offset)] = (rel, start, length, tuple(transforms))
    return index


def _tensor_entry(key: str, path: KeyPath, md: Any, index: dict, where: str) -> TensorEntry:
    dtype = getattr(getattr(md, "properties", None), "dtype", None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{where}: tensor {key!r} has no dtype in its properties")
    shape = _ints(getattr(md, "size", None), f"size of {key!r}", where)
    chunks = []
    for c in getattr(md, "chunks", None) or ():
        offsets = _ints(getattr(c, "offsets", None), f"chunk offsets of {key!r}", where)
        sizes = _ints(getattr(c, "sizes", None), f"chunk sizes of {key!r}", where)
        if len(offsets) != len(shape) or len(sizes) != len(shape) \
                or any(o + s > n for o, s, n in zip(offsets, sizes, shape)):
            raise CorruptCheckpointError(f"{where}: chunk at {offsets} of size {sizes} lies outside "
                                         f"tensor {key!r} of shape {shape}")
        rec = index.get((key, offsets))
        if rec is None:
            raise CorruptCheckpointError(f"{where}: no storage record for chunk {offsets} of {key!r}; "
                                         "the metadata is incomplete")
        chunks.append(Chunk(offsets, sizes, *rec))
    return TensorEntry(key, path, shape, dtype, tuple(chunks))


def parse_metadata(data: bytes, *, where: str) -> DcpMetadata:
    """Unpickles and checks a DCP ``.metadata`` file's bytes.

    Args:
        data: the file's bytes.
        where: the file's name, for error messages.

    Raises:
        UnsafeInputError: the pickle would run code.
        CorruptCheckpointError: it is not DCP metadata, or its fields do not fit together.
    """
    md = unpickle_metadata(data, where=where)
    if not isinstance(md, _Metadata) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise CorruptCheckpointError(f"{where}: holds a {type(md).__name__}, not DCP Metadata")
    version = getattr(md, "version", None)
    if version is not None and (not isinstance(version, str) or version.split(".")[0] != "1"):
        raise CorruptCheckpointError(f"{where}: DCP format version {version!r}; this reader knows 1.x "
                                     "(torch 2.5 - 2.13); upgrade ucp")
    index = _storage_index(getattr(md, "storage_data", None), where)
    planner_data = getattr(md, "planner_data", None)
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, ObjectEntry] = {}
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(key, str):
            raise CorruptCheckpointError(f"{where}: state dict key {key!r} is not a string")
        path = _path_of(key, planner_data)
        if isinstance(entry, _TensorStorageMetadata):
            tensors[key] = _tensor_entry(key, path, entry, index, where)
        elif isinstance(entry, _BytesStorageMetadata):
            rec = index.get((key, None))
            if rec is None:
                raise CorruptCheckpointError(f"{where}: no storage record for object {key!r}")
            objects[key] = ObjectEntry(key, path, *rec)
        else:
            raise CorruptCheckpointError(f"{where}: entry {key!r} is a {type(entry).__name__}")
    return DcpMetadata(version, tensors, objects)


def merge_metadata(parts: list[DcpMetadata], *, where: str) -> DcpMetadata:
    """Merges per-rank metadata (``__R.metadata``, written when saving without collectives).

    Chunks every rank saved identically (replicated tensors) are kept once.

    Raises:
        CorruptCheckpointError: ranks disagree on a tensor's shape or dtype.
    """
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, ObjectEntry] = {}
    for part in parts:
        for key, t in part.tensors.items():
            have = tensors.get(key)
            if have is None:
                tensors[key] = t
                continue
            if (have.shape, have.dtype) != (t.shape, t.dtype):
                raise CorruptCheckpointError(f"{where}: ranks disagree on tensor {key!r}: {have.shape} "
                                             f"{have.dtype} vs {t.shape} {t.dtype}")
            seen = {(c.offsets, c.sizes) for c in have.chunks}
            extra = tuple(c for c in t.chunks if (c.offsets, c.sizes) not in seen)
            tensors[key] = dataclasses.replace(have, chunks=have.chunks + extra)
        for key, o in part.objects.items():
            objects.setdefault(key, o)
    versions = {p.version for p in parts}
    return DcpMetadata(versions.pop() if len(versions) == 1 else None, tensors, objects)
