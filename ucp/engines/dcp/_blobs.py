"""Read the ``torch.save`` blobs that DCP's FileSystemWriter lays end to end in ``.distcp`` files.

Every saved item, tensor chunk or Python object, is one blob at a byte range of a data file, possibly
passed through stream transforms (only ``stream.zstd/1`` exists in torch 2.13). Blobs are loaded with
``torch.load(weights_only=True)``: a blob that needs anything beyond tensors and plain Python values
is refused. Many small blobs (hyper-parameters, step counters) are fetched with few reads by merging
nearby byte ranges of the same file.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Iterable, Sequence

import torch

from ucp.storage import Storage

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError, UnsafeInputError

__all__ = ["Blob", "BlobReader"]

#: Ranges of one file closer than this are read together (cheaper than another request on S3).
_MERGE_GAP = 64 * 1024
#: ...as long as the merged read stays below this.
_MERGE_MAX = 16 * 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"

Blob = tuple[str, int, int, tuple[str, ...], str]  # file, start, length, transforms, key (for messages)


def _spans(blobs: Sequence[Blob]) -> list[tuple[str, int, int, list[int]]]:
    """Groups blob indices into (file, start, end, indices) reads."""
    order = sorted(range(len(blobs)), key=lambda i: (blobs[i][0], blobs[i][1]))
    spans: list[tuple[str, int, int, list[int]]] = []
    for i in order:
        file, start, length = blobs[i][:3]
        end = start + length
        if spans:
            f, s, e, idx = spans[-1]
            if f == file and start - e <= _MERGE_GAP and max(e, end) - s <= _MERGE_MAX:
                spans[-1] = (f, s, max(e, end), idx + [i])
                continue
        spans.append((file, start, end, [i]))
    return spans


class BlobReader:
    """Reads and decodes blobs of one DCP directory.

    Args:
        storage: the checkpoint directory.
        allow_unsafe_pickle: load blobs with the full pickle machinery (can run code from them).
    """

    def __init__(self, storage: Storage, *, allow_unsafe_pickle: bool = False) -> None:
        self.storage = storage
        self.allow_unsafe_pickle = allow_unsafe_pickle

    def _range(self, file: str, start: int, end: int, what: str) -> bytes:
        try:
            data = self.storage.read_range(file, start, end)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{self.storage.url}/{file}: missing data file (holds {what}); "
                                          "copy the whole checkpoint directory") from e
        if len(data) != end - start:
            raise CorruptCheckpointError(
                f"{self.storage.url}/{file}: truncated: {what} needs bytes [{start}, {end}) but the file "
                f"ends at byte {start + len(data)}; the file was cut short, restore it")
        return data

    def raw(self, blobs: Sequence[Blob]) -> list[bytes]:
        """The decoded bytes of each blob, in order, with merged reads."""
        out: list[bytes] = [b""] * len(blobs)

        def fetch(span: tuple[str, int, int, list[int]]) -> None:
            file, start, end, idx = span
            data = self._range(file, start, end, f"{blobs[idx[0]][4]!r}" + (" and more" if len(idx) > 1 else ""))
            view = memoryview(data)
            for i in idx:
                _, s, n, transforms, key = blobs[i]
                out[i] = _untransform(bytes(view[s - start:s - start + n]), transforms, key, file)

        self.storage.map(fetch, _spans(blobs))
        return out

    def objects(self, blobs: Sequence[Blob]) -> list[Any]:
        """Loads each blob as a Python value (tensors and plain values only)."""
        return [_load(data, b, safe=not self.allow_unsafe_pickle) for data, b in zip(self.raw(blobs), blobs)]

    def tensor(self, blob: Blob) -> torch.Tensor:
        (data,) = self.raw([blob])
        value = _load(data, blob, safe=not self.allow_unsafe_pickle)
        if not isinstance(value, torch.Tensor):
            raise CorruptCheckpointError(f"{self.storage.url}/{blob[0]}: {blob[4]!r} holds a "
                                         f"{type(value).__name__} where the metadata promises a tensor")
        return value

    def tensors(self, blobs: Iterable[Blob]) -> Iterable[torch.Tensor]:
        """Loads tensor blobs one at a time (bounded memory), in the given order."""
        for blob in blobs:
            yield self.tensor(blob)


def _untransform(data: bytes, transforms: tuple[str, ...], key: str, file: str) -> bytes:
    # torch's FileSystemReader applies the recorded descriptors in list order to the raw bytes.
    for desc in transforms:
        name, _, version = desc.partition("/")
        if name != "stream.zstd" or version.partition(".")[0] != "1":
            raise ConvertError(f"{file}: {key!r} was written through stream transform {desc!r}, which "
                               "this reader does not know (it knows stream.zstd/1)")
        data = _zstd_decompress(data, key, file)
    return data


def _zstd_decompress(data: bytes, key: str, file: str) -> bytes:
    try:
        import zstandard
    except ImportError:
        try:
            import pyzstd
        except ImportError as e:
            raise ConvertError(f"{file}: {key!r} is zstd-compressed (stream.zstd/1); install the "
                               "'zstandard' package to read it") from e
        decompress = pyzstd.decompress
    else:
        def decompress(raw: bytes) -> bytes:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)) as reader:
                return reader.read()
    try:
        return decompress(data)
    except Exception as e:  # noqa: BLE001 - zstandard/pyzstd raise their own error types
        raise CorruptCheckpointError(f"{file}: {key!r} is recorded as zstd-compressed but does not "
                                     f"decompress ({e}); the file is damaged") from e


def _load(data: bytes, blob: Blob, *, safe: bool) -> Any:
    file, start, _, _, key = blob
    if not data.startswith(_ZIP_MAGIC):
        raise ConvertError(f"{file}: {key!r} at byte {start} is not a torch.save blob; checkpoints "
                           "written with FileSystemWriter(serialization_format=SAFETENSORS) or a custom "
                           "storage writer are not supported")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=safe)
    except pickle.UnpicklingError as e:
        raise UnsafeInputError(f"{file}: {key!r} needs more than tensors and plain Python values to "
                               f"load ({str(e).splitlines()[0]}); refusing to run code from it (only "
                               "for a checkpoint you trust: allow_unsafe_pickle=True)") from e
    except Exception as e:  # noqa: BLE001 - a damaged zip or record
        raise CorruptCheckpointError(f"{file}: {key!r} at byte {start} is a damaged torch.save blob "
                                     f"({type(e).__name__}: {e}); restore the file") from e
