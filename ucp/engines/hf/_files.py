"""Hugging Face safetensors models: one ``.safetensors`` file, or a folder of them with or without
``model.safetensors.index.json``. Read as weights only."""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

import torch

from ucp.core._errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.core._sealed import MAX_JSON_BYTES
from ucp.core._stfile import from_bytes, header_length, parse_header
from ucp.core._text import display_url
from ucp.core._topology import Topology
from ucp.engines._base import ParamInfo, Region, cut
from ucp.storage import Storage

__all__ = ["INDEX", "SafetensorsFiles"]

INDEX = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.safetensors")


def _check_shard_set(files: list[str], *, where: str) -> None:
    """Refuses an incomplete set of ``NAME-XXXXX-of-NNNNN.safetensors`` shards (an export or a
    download cut short), which would otherwise read as a model with part of its tensors.

    Raises:
        CorruptCheckpointError: naming the missing shards.
    """
    sets: dict[tuple[str, int], set[int]] = {}
    for f in files:
        m = _SHARD_NAME.fullmatch(f)
        if m:
            sets.setdefault((m.group(1), int(m.group(3))), set()).add(int(m.group(2)))
    for (stem, total), have in sorted(sets.items()):
        missing = [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1) if i not in have]
        if missing or len({n for s, n in sets if s == stem}) > 1:
            what = (f"{len(missing)} of its {total} shards are missing ({', '.join(missing[:3])}"
                    f"{', ...' if len(missing) > 3 else ''})" if missing else
                    f"it mixes shard sets of different sizes ({stem}-*-of-*)")
            raise CorruptCheckpointError(f"{where}: {what}: an interrupted export or copy; export or "
                                         "copy it again")


class SafetensorsFiles:
    """Plain safetensors: one file, or a directory of them (a Hugging Face checkpoint).

    Only headers are read on opening; :meth:`read` fetches the bytes of the rows a region needs.
    Every tensor is a parameter with the single state ``param`` (``fp32`` reads it as float32);
    there are no optimizer states, buffers or param groups (a run started from it starts its
    optimizer afresh).
    """

    engine = "hf"
    step = None
    topology = Topology()
    partial_reads = True  # a region is read from the byte range of its rows

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = url
        trimmed = url.rstrip("/")
        if trimmed.endswith(".safetensors"):
            parent, _, name = trimmed.rpartition("/")
            self.storage = Storage(parent or ".", storage_options=storage_options)
            files, self.index = [name], None
        else:
            self.storage = Storage(url, storage_options=storage_options)
            self.index = self._read_index()
            listed = sorted(n for n in self.storage.list("") if n.endswith(".safetensors"))
            files = sorted(set(self.index["weight_map"].values())) if self.index else listed
            if not files:
                raise CheckpointNotFoundError(f"{display_url(url)}: no *.safetensors file here")
            _check_shard_set(files, where=display_url(url))
        self.files = files
        self.sizes: dict[str, int] = {}
        self.entries: dict[str, tuple[str, torch.dtype, list[int], int, int]] = {}
        for f, (base, size, header) in zip(files, self.storage.map(self._header, files)):
            self.sizes[f] = size
            for key, (dtype, shape, start, stop) in header.items():
                if key in self.entries:
                    raise CorruptCheckpointError(f"{display_url(url)}: tensor {key!r} is in both "
                                                 f"{self.entries[key][0]} and {f}; remove one copy")
                self.entries[key] = (f, dtype, shape, base + start, base + stop)

    def _read_index(self) -> dict[str, Any] | None:
        if not self.storage.exists(INDEX):
            return None
        where = f"{display_url(self.url)}/{INDEX}"
        raw = self.storage.read(INDEX, max_bytes=MAX_JSON_BYTES)  # its own error names the bound
        try:
            index = json.loads(raw)
            assert isinstance(index, dict) and isinstance(index.get("weight_map"), dict)
            assert all(isinstance(v, str) for v in index["weight_map"].values())
        except (ValueError, AssertionError) as e:
            raise CorruptCheckpointError(f"{where}: not a safetensors index (a JSON object with a "
                                         "weight_map of tensor name -> file)") from e
        for f in set(index["weight_map"].values()):
            if "/" in f or not f.endswith(".safetensors"):
                raise CorruptCheckpointError(f"{where}: weight_map names {f!r}, which is not a "
                                             ".safetensors file beside the index")
        return index

    def _header(self, name: str) -> tuple[int, int, dict[str, Any]]:
        where = f"{display_url(self.storage.url)}/{name}"
        try:
            size = self.storage.size(name)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{where}: missing (the index names it)") from e
        n = header_length(self.storage.read_range(name, 0, 8), where=where, size=size)
        header = parse_header(self.storage.read_range(name, 8, 8 + n), where=where,
                              data_size=size - 8 - n)
        return 8 + n, size, header

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> ParamInfo:
        _, dtype, shape, _, _ = self._entry(name)
        return ParamInfo(shape=tuple(shape), dtype=dtype, states=("param",))

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        f, dtype, shape, start, stop = self._entry(name)
        if state not in ("param", "fp32"):
            raise KeyError(f"{name!r} has only the state 'param' in a safetensors file")
        if region is not None and shape:  # only the rows of the region: one contiguous byte range
            lo, hi = region[0]
            row = (stop - start) // max(1, shape[0]) if shape[0] else 0
            raw = bytearray(self.storage.read_range(f, start + lo * row, start + hi * row))
            t = cut(from_bytes(raw, dtype, [hi - lo, *shape[1:]]), ((0, hi - lo), *region[1:]))
        else:
            t = cut(from_bytes(bytearray(self.storage.read_range(f, start, stop)), dtype, shape), region)
        return t.float() if state == "fp32" else t

    def iter_region(self, name: str, state: str, region: Region) -> Any:
        """``region`` in one piece (see :class:`ucp.engines.SourceCheckpoint`)."""
        yield region, self.read(name, state, region)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {}

    def buffer_names(self) -> list[str]:
        return []

    def param_groups(self) -> list[dict[str, Any]]:
        return []

    def _entry(self, name: str) -> tuple[str, torch.dtype, list[int], int, int]:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {display_url(self.url)}") from None
