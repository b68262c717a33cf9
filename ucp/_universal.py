"""The universal checkpoint: a zarr v3 group with one array per parameter state.

::

    DST/zarr.json                       group; attributes["ucp"] = the table below (written LAST)
    DST/params/<escaped name>/<state>   one array per state: param, fp32, exp_avg, exp_avg_sq, ...
    DST/buffers/<escaped name>          one array per buffer

Every chunk carries a CRC32C (zarr's ``crc32c`` codec), verified on read. bf16/fp16/fp8 are
stored as their bits (uint16/uint8) with the logical dtype in the array's ``ucp_dtype``
attribute. Parameter names are percent-escaped so no name can leave the checkpoint root. A
checkpoint is complete only when ``attributes["ucp"]["complete"]`` is true, and that group
metadata is written last, atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ucp.storage import Storage, zarr_store

from ._errors import ChecksumError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError
from ._meta import FORMAT_VERSION, MAX_JSON_BYTES, loads, seal
from ._stfile import dtype_from_name, dtype_name
from ._topology import Topology
from .engines._base import ParamInfo

__all__ = ["UniversalCheckpoint", "UniversalWriter", "escape_name", "chunk_shape", "open_universal"]

GROUP_META = "zarr.json"
KIND = "ucp-universal"
#: Target bytes per chunk: small enough that a rank reads little it does not need, large enough
#: that per-chunk overhead stays negligible.
CHUNK_BYTES = 4 * 2**20
#: Smallest chunk the split below makes, and how many chunks a leading dim gets when it can.
MIN_CHUNK_BYTES = 64 * 2**10
MIN_SPLITS = 8
_SAFE = re.compile(r"[A-Za-z0-9._-]")
_MAX_NAME = 160
_BITS = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float8_e4m3fn: np.uint8,
         torch.float8_e5m2: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32,
         torch.uint64: np.uint64}


def escape_name(name: str) -> str:
    """A path segment for ``name``: percent-escapes all but ``[A-Za-z0-9._-]``, and a leading
    ``.`` or ``_``; long names are cut and suffixed with a hash. Injective in practice."""
    out = "".join(c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in name)
    if not out or out[0] in "._":
        out = f"%{ord(out[0]):02X}{out[1:]}" if out else "%00"
    if len(out) > _MAX_NAME:
        out = f"{out[:_MAX_NAME - 18]}~{hashlib.sha1(name.encode()).hexdigest()[:16]}"
    return out


def chunk_shape(shape: Sequence[int], itemsize: int, target: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk shape of about ``target`` bytes: the two leading dims are halved, largest first,
    so both row- and column-parallel cuts read little beyond what they need. Then, while chunks
    stay above ``MIN_CHUNK_BYTES``, each leading dim is halved until it has ``MIN_SPLITS``
    chunks, so a 1/2 .. 1/8 slice of a mid-sized tensor (TP, ZeRO-3) still reads about itself."""
    chunk = [max(1, s) for s in shape]
    if not chunk:
        return ()
    lead = range(min(2, len(chunk)))
    while math.prod(chunk) * itemsize > target:
        i = max(lead, key=lambda d: chunk[d])
        if chunk[i] == 1:
            break
        chunk[i] = (chunk[i] + 1) // 2
    while math.prod(chunk) * itemsize >= 2 * MIN_CHUNK_BYTES:
        coarse = [d for d in lead if chunk[d] > 1 and chunk[d] * MIN_SPLITS > shape[d]]
        if not coarse:
            break
        i = max(coarse, key=lambda d: chunk[d])
        chunk[i] = (chunk[i] + 1) // 2
    return tuple(chunk)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous().cpu()
    if t.dtype in _BITS and t.dtype is not torch.float16:
        bits = {2: torch.uint16, 1: torch.uint8, 4: torch.uint32, 8: torch.uint64}[t.element_size()]
        return t.view(bits).numpy()
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape))  # ascontiguousarray makes 0-d 1-d
    return t.view(dtype) if t.dtype != dtype else t


class UniversalWriter:
    """Writes a universal checkpoint: arrays first (any order, any process), metadata last.

    ``begin`` and ``commit`` run in one process (the coordinator); ``write`` may run in many
    processes at once, each for different parameters.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage = Storage(url, storage_options=storage_options)
        self.url = url
        self._store = None

    def begin(self, *, overwrite: bool) -> None:
        """Marks the destination incomplete (refusing to replace a complete one unless ``overwrite``)."""
        if self.storage.exists(GROUP_META):
            try:
                complete = _read_attrs(self.storage).get("complete") is True
            except CorruptCheckpointError:
                complete = False
            if complete and not overwrite:
                raise CheckpointExistsError(f"{self.url} already holds a complete universal "
                                            "checkpoint; pass overwrite=True (--overwrite) to replace it")
        _write_attrs(self.storage, {"format_version": FORMAT_VERSION, "kind": KIND, "complete": False})

    def write(self, path: str, tensor: torch.Tensor) -> dict[str, Any]:
        """Writes one array at ``path`` (relative); returns its table entry."""
        import zarr
        from zarr.codecs import BytesCodec, Crc32cCodec

        if self._store is None:
            self._store = zarr_store(self.storage, read_only=False)
        data = to_numpy(tensor)
        arr = zarr.create_array(self._store, name=path, shape=data.shape, dtype=data.dtype,
                                chunks=chunk_shape(data.shape, data.dtype.itemsize),
                                filters=None, compressors=[Crc32cCodec()], serializer=BytesCodec(),
                                fill_value=0, attributes={"ucp_dtype": dtype_name(tensor.dtype)},
                                overwrite=True)
        if data.size:
            arr[...] = data
        return {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype),
                "nbytes": int(data.nbytes)}

    def commit(self, table: Mapping[str, Any]) -> None:
        """Writes the final group metadata (the commit); must come after every array."""
        _write_attrs(self.storage, {**table, "format_version": FORMAT_VERSION, "kind": KIND,
                                    "complete": True})


def _write_attrs(storage: Storage, attrs: Mapping[str, Any]) -> None:
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"ucp": seal(attrs)}}
    storage.write(GROUP_META, json.dumps(doc, allow_nan=False).encode())


def _read_attrs(storage: Storage) -> dict[str, Any]:
    where = f"{storage.url}/{GROUP_META}"
    try:
        raw = storage.read(GROUP_META, max_bytes=MAX_JSON_BYTES)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{storage.url} is not a universal checkpoint "
                                      f"(no {GROUP_META}); create one with `ucp convert`") from e
    try:
        doc = json.loads(raw)
        attrs = doc["attributes"]["ucp"]
        assert isinstance(attrs, dict)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise CorruptCheckpointError(f"{where}: not a ucp universal checkpoint's group metadata") from e
    return loads(json.dumps(attrs).encode(), what=where)


class UniversalCheckpoint:
    """A complete universal checkpoint, opened for reading (``ucp.open``).

    Example:
        >>> ckpt = ucp.open("/ckpt/universal")
        >>> for name in ckpt.names():
        ...     w = ckpt.read(name, state="fp32")
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        self.storage = Storage(url, storage_options=storage_options)
        attrs = _read_attrs(self.storage)
        if attrs.get("kind") != KIND or attrs.get("complete") is not True:
            raise CorruptCheckpointError(f"{url} is an incomplete universal checkpoint (its "
                                         "conversion did not finish); run `ucp convert` again")
        self._attrs = attrs
        self._params: dict[str, dict[str, Any]] = dict(attrs.get("params") or {})
        self._buffers: dict[str, dict[str, Any]] = dict(attrs.get("buffers") or {})
        self._store = zarr_store(self.storage, read_only=True)

    @property
    def step(self) -> int | None:
        return self._attrs.get("step")

    @property
    def engine(self) -> str | None:
        return (self._attrs.get("source") or {}).get("engine")

    @property
    def topology(self) -> Topology | None:
        text = (self._attrs.get("source") or {}).get("topology")
        return Topology.parse(text) if text else None

    @property
    def spec(self) -> str | None:
        return self._attrs.get("spec")

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return list(self._attrs.get("param_groups") or [])

    @property
    def aliases(self) -> dict[str, str]:
        """Tied weights: other names the model uses for a parameter (alias -> name)."""
        return dict(self._attrs.get("aliases") or {})

    @property
    def metadata(self) -> dict[str, Any]:
        """The whole group attribute table (a copy)."""
        return json.loads(json.dumps(self._attrs))

    def names(self) -> list[str]:
        return list(self._params)

    def buffer_names(self) -> list[str]:
        return list(self._buffers)

    def info(self, name: str) -> ParamInfo:
        e = self._entry(name)
        return ParamInfo(shape=tuple(e["shape"]), dtype=dtype_from_name(e["dtype"]),
                         states=tuple(e["states"]), frozen=bool(e.get("frozen")), group=e.get("group"))

    def read(self, name: str, state: str = "fp32", region: Sequence[slice] | None = None) -> torch.Tensor:
        """One state of a parameter, or only ``region`` of it (reads only the chunks needed)."""
        e = self._entry(name)
        if state == "param" and "param" not in e["states"] and "fp32" in e["states"]:
            # an fp32 model stores its weights once, as the fp32 state
            return self._read_array(f"{e['path']}/fp32", region).to(dtype_from_name(e["dtype"]))
        if state not in e["states"]:
            raise KeyError(f"parameter {name!r} has no state {state!r}; it has {e['states']}")
        return self._read_array(f"{e['path']}/{state}", region)

    def read_buffer(self, name: str) -> torch.Tensor:
        if name not in self._buffers:
            raise KeyError(f"no buffer {name!r} in {self.url}")
        return self._read_array(self._buffers[name]["path"], None)

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r} in {self.url} ({len(self._params)} parameters; "
                           "see .names())") from None

    def _read_array(self, path: str, region: Sequence[slice] | None) -> torch.Tensor:
        import zarr

        try:
            arr = zarr.open_array(self._store, path=path, mode="r")
            dtype = dtype_from_name(arr.attrs.get("ucp_dtype", ""))
            data = arr[tuple(region) if region is not None else ...]
        except (FileNotFoundError, KeyError) as e:
            raise CorruptCheckpointError(f"{self.url}/{path}: array missing ({e})") from e
        except ValueError as e:
            if "checksum" in str(e).lower():
                raise ChecksumError(f"{self.url}/{path}: a chunk's CRC32C does not match (the "
                                    "file is corrupt); convert the checkpoint again") from e
            raise CorruptCheckpointError(f"{self.url}/{path}: {e}") from e
        return from_numpy(np.asarray(data), dtype)


def open_universal(url: str, *, storage_options: Mapping[str, Any] | None = None) -> UniversalCheckpoint:
    """Opens a complete universal checkpoint (``ucp.open``).

    Raises:
        CheckpointNotFoundError: nothing at ``url``.
        CorruptCheckpointError: incomplete or damaged.
    """
    return UniversalCheckpoint(url, storage_options=storage_options)
