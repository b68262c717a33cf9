"""A DCP directory's saved entries by key, for readers whose key layout is not ``get_state_dict``'s.

:class:`DcpFiles` opens the metadata (restricted unpickling, every data file present and long
enough) and reads entries by their flattened key: a tensor, or a box of it reading only the chunks
that overlap the box, and small values with merged reads. Which key is what is left to the caller
(``_layout`` for ``get_state_dict`` checkpoints; the Megatron-core plugin for ``dist_checkpointing``).

Example::

    files = DcpFiles("ckpt/iter_0000100")
    entry = files.metadata.tensors["decoder.layers.mlp.linear_fc2.weight"]
    layer3 = files.tensor(entry, ((3, 4), (0, entry.shape[1]), (0, entry.shape[2])))
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from ucp.storage import Storage

from .._base import Region
from ._blobs import BlobReader
from ._meta import DcpMetadata, ObjectEntry, TensorEntry
from ._reader import _blob, _check_files, _check_tiling, _checked, _read_metadata

__all__ = ["DcpFiles"]


class DcpFiles:
    """The entries of one DCP directory (``.metadata`` + ``__<rank>_<n>.distcp``).

    Args:
        url: the directory (local path or fsspec URL).
        storage_options: fsspec options.
        allow_unsafe_pickle: load saved values with the full pickle machinery (trusted input only).

    Attributes:
        url, storage, metadata: where it is, and its checked metadata.

    Raises:
        CheckpointNotFoundError: no metadata, or a data file it names is missing.
        CorruptCheckpointError: malformed metadata or a truncated data file.
        UnsafeInputError: the metadata pickle would run code.
    """

    def __init__(self, url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                 allow_unsafe_pickle: bool = False) -> None:
        self.url = os.fspath(url)
        self.storage = Storage(self.url, storage_options=storage_options)
        self._blobs = BlobReader(self.storage, allow_unsafe_pickle=allow_unsafe_pickle)
        listing = self.storage.list("")
        self.metadata: DcpMetadata = _read_metadata(self.storage, listing)
        _check_files(self.storage, self.metadata, listing)

    def tensor(self, entry: TensorEntry, region: Region | None = None) -> torch.Tensor:
        """The global tensor of ``entry``, or only ``region`` of it (reading the chunks it overlaps).

        Raises:
            CorruptCheckpointError: the chunks do not tile the tensor, or one holds the wrong shape.
        """
        _check_tiling(entry, self.url)
        box = region or tuple((0, n) for n in entry.shape)
        out = torch.empty([b - a for a, b in box], dtype=entry.dtype)
        wanted = [c for c in entry.chunks if _overlap(c.offsets, c.sizes, box) is not None]
        wanted.sort(key=lambda c: (c.file, c.start))
        for c, t in zip(wanted, self._blobs.tensors(_blob(entry, c) for c in wanted)):
            t = _checked(t, entry, c.sizes, self.url)
            both = _overlap(c.offsets, c.sizes, box)
            assert both is not None
            src = tuple(slice(a - o, b - o) for (a, b), o in zip(both, c.offsets))
            dst = tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(both, box))
            out[dst] = t[src]
        return out

    def raw(self, entries: Sequence[ObjectEntry]) -> list[bytes]:
        """The saved bytes of each value (a ``torch.save`` archive), for callers with their own loader."""
        return self._blobs.raw([_blob(e) for e in entries])

    def values(self, entries: Sequence[ObjectEntry]) -> list[Any]:
        """Small saved Python values (``torch.load(weights_only=True)``), with merged reads."""
        return self._blobs.objects([_blob(e) for e in entries])


def _overlap(offsets: tuple[int, ...], sizes: tuple[int, ...], box: Region) -> Region | None:
    """The part of a chunk inside ``box`` (global coordinates), or None when they do not meet."""
    both = tuple((max(o, a), min(o + s, b)) for o, s, (a, b) in zip(offsets, sizes, box))
    return None if any(a >= b for a, b in both) else both
