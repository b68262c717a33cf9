"""Write small DCP directories by hand, in the layout FileSystemWriter produces, for property tests.

Uses torch's own metadata classes and ``torch.save`` blobs, so the result is what ``dcp.load`` reads;
unlike ``dcp.save`` it can cut a tensor into any grid of chunks spread over any number of files.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
from typing import Sequence

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)


def grid_chunks(shape: Sequence[int], cuts: Sequence[Sequence[int]]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(offsets, sizes) of every cell of the grid that ``cuts`` (inner cut points per dim) make."""
    bounds = [[0, *sorted(set(c)), n] for c, n in zip(cuts, shape)]
    cells = []
    for pick in itertools.product(*(range(len(b) - 1) for b in bounds)):
        offsets = tuple(b[i] for b, i in zip(bounds, pick))
        sizes = tuple(b[i + 1] - b[i] for b, i in zip(bounds, pick))
        cells.append((offsets, sizes))
    return cells


def write_tiled(path: str, key: str, tensor: torch.Tensor, chunks: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
                files: Sequence[int]) -> None:
    """Saves ``tensor`` under ``key`` as ``chunks``, chunk i going to file ``__<files[i]>_0.distcp``."""
    os.makedirs(path, exist_ok=True)
    streams: dict[int, io.BytesIO] = {}
    storage = {}
    for (offsets, sizes), rank in zip(chunks, files):
        region = tensor[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone()
        stream = streams.setdefault(rank, io.BytesIO())
        start = stream.tell()
        torch.save(region, stream)
        storage[MetadataIndex(key, offsets)] = _StorageInfo(f"__{rank}_0.distcp", start, stream.tell() - start)
    for rank, stream in streams.items():
        with open(os.path.join(path, f"__{rank}_0.distcp"), "wb") as f:
            f.write(stream.getvalue())
    md = Metadata(
        state_dict_metadata={key: TensorStorageMetadata(
            TensorProperties(dtype=tensor.dtype), tensor.shape,
            [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in chunks])},
        planner_data={key: tuple(key.split(".", 1))}, storage_data=storage, version="1.0.0")
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(md, f)
