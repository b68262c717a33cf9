"""The safetensors file format, written as a stream of buffers and read without copies.

Writing hands the storage layer the header and then each tensor's own memory, so no second copy
of the state is ever made; the storage layer checksums while it writes. Files are plain
safetensors and open with ``safetensors.safe_open`` too.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Mapping

import torch

from ucp.core._errors import CorruptCheckpointError, StateError

__all__ = ["DTYPE_NAMES", "encode", "decode", "dtype_from_name", "dtype_name", "tensor_bytes",
           "header_length", "parse_header", "from_bytes"]

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.uint16: "U16", torch.uint32: "U32",
    torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}
#: torch dtype <-> its name in ucp metadata (``"float32"``, ``"bfloat16"``...).
DTYPE_NAMES: dict[torch.dtype, str] = {d: str(d).removeprefix("torch.") for d in _ST_DTYPES}
_FROM_NAME = {v: k for k, v in DTYPE_NAMES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError as e:
        raise StateError(f"dtype {dtype} cannot be saved; supported: "
                         f"{', '.join(sorted(DTYPE_NAMES.values()))}") from e


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _FROM_NAME[name]
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"unknown dtype {name!r} in checkpoint metadata") from e


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
           ) -> list[memoryview | bytes]:
    """The buffers of a safetensors file holding ``tensors`` (contiguous CPU tensors).

    Tensors are laid out by decreasing item size, so each starts aligned to its item size.
    The returned buffers alias the tensors' memory: keep the tensors alive while writing.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset, views = 0, []
    for key in order:
        t = tensors[key]
        if t.device.type != "cpu" or not t.is_contiguous():
            raise StateError(f"tensor {key!r} must be a contiguous CPU tensor to be written")
        view = tensor_bytes(t)
        try:
            st = _ST_DTYPES[t.dtype]
        except KeyError as e:
            raise StateError(f"tensor {key!r} has dtype {t.dtype}, which cannot be saved") from e
        header[key] = {"dtype": st, "shape": list(t.shape), "data_offsets": [offset, offset + view.nbytes]}
        offset += view.nbytes
        views.append(view)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [struct.pack("<Q", len(raw)) + raw, *views]


def header_length(prefix: bytes, *, where: str, size: int) -> int:
    """The JSON header length from a file's first 8 bytes (``size`` is the file's size)."""
    if len(prefix) < 8:
        raise CorruptCheckpointError(f"{where}: {len(prefix)} bytes is too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", prefix, 0)
    if n > min(_MAX_HEADER, size - 8):
        raise CorruptCheckpointError(f"{where}: safetensors header length {n} is invalid")
    return n


def parse_header(raw: bytes, *, where: str, data_size: int
                 ) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """``{key: (dtype, shape, start, stop)}`` from a safetensors JSON header; offsets are
    relative to the data section of ``data_size`` bytes and checked against it."""
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError) as e:
        raise CorruptCheckpointError(f"{where}: safetensors header is not a JSON object") from e
    out = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _FROM_ST[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: bad safetensors entry for {key!r}") from e
        if any(s < 0 for s in shape):
            raise CorruptCheckpointError(f"{where}: negative dimension in {key!r}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= stop <= data_size or stop - start != math.prod(shape) * itemsize:
            raise CorruptCheckpointError(f"{where}: tensor {key!r} offsets [{start}, {stop}) do not "
                                         f"fit its shape {shape} or the file")
        out[key] = (dtype, shape, start, stop)
    return out


def decode(data: bytearray | bytes, *, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in ``data`` (views into it when it is a bytearray).

    Raises:
        CorruptCheckpointError: malformed header or offsets, naming ``where``.
    """
    n = header_length(bytes(data[:8]), where=where, size=len(data))
    base = 8 + n
    entries = parse_header(bytes(data[8:base]), where=where, data_size=len(data) - base)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    out: dict[str, torch.Tensor] = {}
    for key, (dtype, shape, start, stop) in entries.items():
        out[key] = from_bytes(buf, dtype, shape, offset=base + start)
    return out


def from_bytes(buf: bytearray, dtype: torch.dtype, shape: list[int] | tuple[int, ...], *,
               offset: int = 0) -> torch.Tensor:
    """A tensor viewing ``buf`` at ``offset`` (no copy)."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=torch.uint8, count=n, offset=offset).view(dtype).view(shape)
