"""The safetensors file format, written as a stream of buffers and read without copies.

Writing hands the storage layer the header and then each tensor's own memory, so no second copy
of the state is ever made; the storage layer checksums while it writes. Files are plain
safetensors and open with ``safetensors.safe_open`` too.
"""

from __future__ import annotations

import json
import struct
from typing import Mapping

import torch

from ._errors import CorruptCheckpointError, StateError

__all__ = ["DTYPE_NAMES", "encode", "decode", "dtype_from_name", "dtype_name"]

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


def _bytes_of(t: torch.Tensor) -> memoryview:
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
        view = _bytes_of(t)
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


def decode(data: bytearray | bytes, *, where: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file held in ``data`` (views into it when it is a bytearray).

    Raises:
        CorruptCheckpointError: malformed header or offsets, naming ``where``.
    """
    if len(data) < 8:
        raise CorruptCheckpointError(f"{where}: {len(data)} bytes is too short for a safetensors file")
    (n,) = struct.unpack_from("<Q", data, 0)
    if n > min(_MAX_HEADER, len(data) - 8):
        raise CorruptCheckpointError(f"{where}: safetensors header length {n} is invalid")
    try:
        header = json.loads(bytes(data[8:8 + n]))
        assert isinstance(header, dict)
    except (ValueError, AssertionError) as e:
        raise CorruptCheckpointError(f"{where}: safetensors header is not a JSON object") from e
    base, end = 8 + n, len(data)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    out: dict[str, torch.Tensor] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _FROM_ST[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            start, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: bad safetensors entry for {key!r}") from e
        count = 1
        for s in shape:
            if s < 0:
                raise CorruptCheckpointError(f"{where}: negative dimension in {key!r}")
            count *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= start <= stop <= end - base or stop - start != count * itemsize:
            raise CorruptCheckpointError(f"{where}: tensor {key!r} offsets [{start}, {stop}) do not "
                                         f"fit its shape {shape} or the file")
        if count == 0:
            out[key] = torch.empty(shape, dtype=dtype)
        else:
            out[key] = torch.frombuffer(buf, dtype=torch.uint8, count=stop - start,
                                        offset=base + start).view(dtype).view(shape)
    return out
