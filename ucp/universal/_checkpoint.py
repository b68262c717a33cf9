"""The universal checkpoint: a zarr v3 group with one array per parameter state.

::

    DST/zarr.json                       group; attributes["ucp"] = the table below (written LAST)
    DST/params/<escaped name>/<state>   one array per state: param, fp32, exp_avg, exp_avg_sq, ...
    DST/buffers/<escaped name>          one array per buffer

Arrays are zarr v3 sharded arrays (see :mod:`ucp.universal._shard`; format 2 keys the shards ``c.i.j``
beside the array's ``zarr.json``, format 1 ``c/i/j``, both read): small inner chunks, the unit a reader
reads, stored together in one shard file per array (per GiB); every inner chunk and every shard
index carries a CRC32C (zarr's ``crc32c`` codec), verified on read, and the table records the
CRC32C of every array's ``zarr.json``. bf16/fp16/fp8 are
stored as their bits (uint16/uint8) with the logical dtype in the array's ``ucp_dtype``
attribute. Parameter names are percent-escaped so no name can leave the checkpoint root. A
checkpoint is complete only when ``attributes["ucp"]["complete"]`` is true, and that group
metadata is written last, atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import struct
import math
import re
import threading
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from crc32c import crc32c

from ucp.storage import Flusher, Storage, checksum
from ucp.universal._zarr import zarr_store

from ucp.core._errors import (ChecksumError, CheckpointExistsError, CheckpointNotFoundError, CorruptCheckpointError,
                              UcpError, VerificationError)
from ucp.core._fingerprint import fingerprint as fingerprint_of
from ucp.core._fingerprint import combine, from_hex, to_hex
from ucp.core._sealed import MAX_JSON_BYTES, load_sealed, seal
from ucp.universal._meta import ArrayEntry, UniversalMeta
from ucp.universal._shard import ChunkReader, Layout, ShardParts, layout_of, shard_shape, sharded_meta
from ucp.core._stfile import dtype_from_name, dtype_name
from ucp.core._topology import Topology
from ucp.universal._tiles import RowBuffer, TiledShard, tiles_fit
from ucp.core._params import ParamInfo

__all__ = ["UniversalCheckpoint", "UniversalWriter", "OpenedArray", "escape_name", "chunk_shape", "open_universal"]

GROUP_META = "zarr.json"
_GROUP_NODE = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()
KIND = "ucp-universal"
#: Version of the universal layout this ucp writes: 2 keys shards ``c.i.j`` beside the array's
#: ``zarr.json`` (no directory per dim); 1 keyed them ``c/i/j``. Both are read.
FORMAT_VERSION = 2
READS = (1, 2)
#: Target bytes per chunk: small enough that a rank reads little it does not need, large enough
#: that per-chunk overhead stays negligible.
CHUNK_BYTES = 4 * 2**20
#: Smallest chunk the split below makes, and how many chunks a leading dim gets when it can.
MIN_CHUNK_BYTES = 64 * 2**10
#: Shard files from this size on are written around the page cache (:mod:`ucp.storage._direct`);
#: smaller ones through it, their write-back started at once (:class:`ucp.storage.Flusher`).
DIRECT_BYTES = 1 << 20
MIN_SPLITS = 8
_SAFE = re.compile(r"[A-Za-z0-9._-]")
#: Largest array metadata file (``zarr.json``) read: a few hundred bytes in practice.
MAX_ARRAY_META = 1 << 20
_MAX_NAME = 160
_BITS = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float8_e4m3fn: np.uint8,
         torch.float8_e5m2: np.uint8, torch.uint16: np.uint16, torch.uint32: np.uint32,
         torch.uint64: np.uint64}


def escape_name(name: str) -> str:
    """A path segment for ``name``: percent-escapes all but ``[A-Za-z0-9._-]``, a leading ``.``
    or ``_``, and the dot of ``zarr.json`` (the group's own metadata file lives beside the
    parameters' directories); long names are cut and suffixed with a hash. Injective in practice."""
    out = "".join(c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in name)
    if not out or out[0] in "._":
        out = f"%{ord(out[0]):02X}{out[1:]}" if out else "%"
    if out.lower() == GROUP_META:
        out = f"{out[:4]}%2E{out[5:]}"
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


class WrittenArray:
    """An array handed to storage by :meth:`UniversalWriter.write_later`: its table entry, whose
    fingerprint is complete once the fingerprints of its rows of tiles are."""

    def __init__(self, entry: dict[str, Any], tiled: list[TiledShard],
                 parts: tuple[str, dict[Any, int], int] | None) -> None:
        self._entry, self._tiled, self._parts = entry, tiled, parts

    def done(self) -> bool:
        """Whether :meth:`result` will return without waiting."""
        return all(t.done() for t in self._tiled)

    def result(self) -> dict[str, Any]:
        """The table entry (waits for the row fingerprints still running)."""
        if self._parts is not None:
            for t in self._tiled:
                t.settle()
            where, prints, pieces = self._parts
            self._parts, self._tiled = None, []
            if len(prints) != pieces:  # every row of tiles is fingerprinted as encoded
                raise VerificationError(f"{where}: {len(prints)} of its {pieces} rows of inner chunks were "
                                        "fingerprinted as written; report this bug")
            self._entry["fingerprint"] = to_hex(combine(prints.values()))
        return self._entry


class UniversalWriter:
    """Writes a universal checkpoint: arrays first (any order, any process), metadata last.

    ``begin`` and ``commit`` run in one process (the coordinator); ``write`` may run in many
    processes at once, each for different parameters.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.storage = Storage(url, storage_options=storage_options)
        self.url = url
        self._groups: set[str] = set()
        self._rows = RowBuffer()
        self._flusher = Flusher(self.storage)

    def check_destination(self, *, overwrite: bool) -> None:
        """Refuses to replace a complete universal checkpoint unless ``overwrite``, and any
        directory that holds other files (a swap would delete them).

        Raises:
            CheckpointExistsError: naming the destination and the fix.
        """
        if self.storage.exists(GROUP_META):
            try:
                complete = _read_attrs(self.storage).get("complete") is True
            except CorruptCheckpointError:
                complete = False
            if complete and not overwrite:
                raise CheckpointExistsError(f"{self.url} already holds a complete universal "
                                            "checkpoint; pass overwrite=True (--overwrite) to replace it")
            return
        listed = self.storage.list("")
        if listed:
            raise CheckpointExistsError(f"{self.url} holds files that are not a universal checkpoint "
                                        f"({', '.join(listed[:3])}{', ...' if len(listed) > 3 else ''}); "
                                        "convert into a new or empty directory")

    def begin(self, *, overwrite: bool) -> None:
        """Marks the destination incomplete (refusing to replace a complete one unless ``overwrite``)."""
        self.check_destination(overwrite=overwrite)
        _write_attrs(self.storage, {"format_version": FORMAT_VERSION, "kind": KIND, "complete": False})

    def write(self, path: str, tensor: torch.Tensor, *, fingerprint: bool = False) -> dict[str, Any]:
        """Writes one array at ``path`` (relative); returns its table entry (with
        ``fingerprint``: the fingerprint of the bytes written, see :mod:`ucp.core._fingerprint`).
        """
        return self.write_later(path, tensor, fingerprint=fingerprint).result()

    def write_later(self, path: str, tensor: torch.Tensor, *, fingerprint: bool = False) -> WrittenArray:
        """:meth:`write`, returning as soon as the array's bytes are handed to storage: the
        fingerprints of its last rows of tiles may still be running on the helper thread (they
        lag the writes; the row buffers bound how far), so the next array is encoded meanwhile.
        The entry comes from the result's :meth:`WrittenArray.result`.

        Shards are encoded here, as zarr v3's sharding codec specifies them (inner chunks of
        little-endian bytes, each followed by its CRC32C, edge chunks padded with the fill value;
        the index last), without zarr's per-chunk machinery, which costs several times the I/O
        itself; a local shard streams to its file one row of inner chunks at a time
        (:mod:`ucp.universal._tiles`).
        """
        data = to_numpy(tensor)
        chunks = chunk_shape(data.shape, data.dtype.itemsize)
        sharded = data.ndim > 0 and data.size > 0
        shard = shard_shape(data.shape, chunks, data.dtype.itemsize) if sharded else chunks
        meta = {"zarr_format": 3, "node_type": "array", "shape": list(data.shape),
                "data_type": data.dtype.name if data.dtype != np.bool_ else "bool",
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
                "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
                "fill_value": False if data.dtype == np.bool_ else 0,
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "attributes": {"ucp_dtype": dtype_name(tensor.dtype)}, "storage_transformers": []}
        prints: dict[Any, int] | None = {} if fingerprint and sharded else None
        tiled: list[TiledShard] = []
        if sharded:
            meta.update(sharded_meta(chunks, shard))
            tiled = self._write_shards(path, data, chunks, shard, prints)
        elif data.ndim == 0:  # a 0-d array: one plain chunk
            raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
            self.storage.write(f"{path}/c", [raw, struct.pack("<I", crc32c(raw))], fsync=False, atomic=False)
        encoded = json.dumps(meta).encode()
        # not atomic (no temporary and rename): nothing reads an array before the commit
        self.storage.write(f"{path}/zarr.json", encoded, fsync=False, atomic=False)
        self._write_parents(path)
        entry = {"shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype), "nbytes": int(data.nbytes),
                 "meta_crc32c": crc32c(encoded)}
        if not fingerprint:
            return WrittenArray(entry, [], None)
        # of the chunks as encoded (bits of bf16 and friends), summed
        pieces = -(-data.shape[0] // chunks[0]) if tiles_fit(data.shape, chunks) \
            else math.prod(-(-n // c) for n, c in zip(data.shape, chunks))  # rows of chunks, or chunks
        if prints is None or (not tiled and len(prints) != pieces):  # no parts: the whole array, now
            entry["fingerprint"] = to_hex(fingerprint_of(torch.from_numpy(data)))
            return WrittenArray(entry, [], None)
        return WrittenArray(entry, tiled, (f"{self.url}/{path}", prints, pieces))

    def _write_shards(self, path: str, data: np.ndarray, chunks: tuple[int, ...], shard: tuple[int, ...],
                      prints: dict[Any, int] | None) -> list[TiledShard]:
        """Writes the shard files of a non-empty array; with ``prints``, the partial fingerprint
        of each row of inner chunks (or, for other chunkings, each chunk) goes into it, a tiled
        shard's once it is settled (returned: the tiled shards written)."""
        cells = list(itertools.product(*(range(-(-s // c)) for s, c in zip(data.shape, shard))))
        local = self.storage.is_local or len(cells) == 1  # the page cache absorbs writes best from one thread

        def parts(idx: tuple[int, ...]) -> Any:
            if tiles_fit(data.shape, chunks):  # rows of tiles in a reused buffer (one at a time: local only)
                return TiledShard(data, chunks, shard, idx, rows=self._rows if local else RowBuffer(),
                                  prints=prints)
            return ShardParts(data, chunks, shard, idx, prints)

        tiled: list[TiledShard] = []

        def write(idx: tuple[int, ...]) -> None:
            key = f"{path}/{'.'.join(('c', *map(str, idx)))}"  # no directory per dim
            shard = parts(idx)
            if isinstance(shard, TiledShard):
                tiled.append(shard)  # settled by the caller: its rows' fingerprints may still run
            direct = shard.total() >= DIRECT_BYTES  # around the page cache, written while encoding
            self.storage.write(key, shard, fsync=False, atomic=False, direct=direct,
                               crc=False)  # every inner chunk and the index carry their own CRC32C
            if not direct:
                self._flusher.add(key)  # its write-back starts now, while the next array is encoded
        if local:
            for idx in cells:
                write(idx)
        else:  # object stores: latency-bound, so several requests in flight
            self.storage.map(write, cells)
        return tiled

    def _write_parents(self, path: str) -> None:
        """Explicit group nodes for ``params/`` and ``params/<name>/`` (zarr v3 has no implicit groups)."""
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            group = "/".join(parts[:i])
            if group not in self._groups:
                self._groups.add(group)
                self.storage.write(f"{group}/zarr.json", _GROUP_NODE, fsync=False, atomic=False)

    def finish(self) -> None:
        """Makes every array written so far durable (local disk: their write-back started as
        each was written; one ``syncfs`` now, which also covers other processes' arrays on
        this filesystem). Called by each process that wrote arrays, before the commit.

        Raises:
            StorageError: the data could not be written to disk.
        """
        self._flusher.finish()

    def commit(self, table: Mapping[str, Any]) -> None:
        """Writes the final group metadata (the commit), once every array is written and
        durable (:meth:`finish`, which this calls for the arrays on this machine)."""
        self.finish()
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
    return load_sealed(json.dumps(attrs).encode(), what=where, versions=READS)


@dataclasses.dataclass
class OpenedArray:
    """A universal array opened for reading: where it is, what it holds, how to read it."""

    path: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...]  # the unit of reading (inner chunks of a sharded array)
    dtype: torch.dtype  # the logical dtype
    np_dtype: Any  # the stored numpy dtype (bits for bf16 and friends)
    layout: Layout | None  # ucp's layout: chunks read straight from their files
    zarr: Any = None  # any other layout: the zarr array


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
        self.meta = UniversalMeta.from_attrs(attrs, where=f"{url}/{GROUP_META}", check_path=self.storage.path)
        self._params, self._buffers = self.meta.params, self.meta.buffers
        self._store: Any = None
        self._arrays: dict[str, OpenedArray] = {}
        self._lock = threading.Lock()  # the resharder reads from several threads
        self._reader = ChunkReader(self.storage, url)

    @property
    def step(self) -> int | None:
        return self.meta.step

    @property
    def engine(self) -> str | None:
        return self.meta.engine

    @property
    def topology(self) -> Topology | None:
        return Topology.parse(self.meta.topology) if self.meta.topology else None

    @property
    def spec(self) -> str | None:
        return self.meta.spec

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [dict(g) for g in self.meta.param_groups]

    @property
    def aliases(self) -> dict[str, str]:
        """Tied weights: other names the model uses for a parameter (alias -> name)."""
        return dict(self.meta.aliases)

    @property
    def extras(self) -> dict[str, Any]:
        """The source's other training state that JSON holds (e.g. torchtitan's ``lr_scheduler`` and
        ``train_state``); empty when it had none."""
        return json.loads(json.dumps(self._attrs.get("extras") or {}))

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
        return ParamInfo(shape=e.shape, dtype=dtype_from_name(e.dtype), states=e.states, frozen=e.frozen,
                         group=e.group)

    def read(self, name: str, state: str = "fp32", region: Sequence[slice] | None = None) -> torch.Tensor:
        """One state of a parameter, or only ``region`` of it (reads only the chunks needed)."""
        a, cast = self.state_array(name, state)
        t = self.read_array(a, region)
        return t if cast is None else t.to(cast)

    def state_array(self, name: str, state: str | None) -> tuple[OpenedArray, torch.dtype | None]:
        """The opened array of a parameter's state (``state=None``: the buffer ``name``), and
        the dtype its values are cast to when read (an fp32 model keeps its weights once, as the
        ``fp32`` state, and reads them back as ``param`` in the model's dtype)."""
        if state is None:
            if name not in self._buffers:
                raise KeyError(f"no buffer {name!r} in {self.url}")
            e = self._buffers[name]
            return self.open_array(e.path, e.shape, e.meta_crc(None)), None
        e = self._entry(name)
        stored, cast = state, None
        if state == "param" and "param" not in e.states and "fp32" in e.states:
            stored, cast = "fp32", dtype_from_name(e.dtype)
        if stored not in e.states:
            raise KeyError(f"parameter {name!r} has no state {state!r} in {self.url}; it has {list(e.states)}")
        a = self.open_array(f"{e.path}/{stored}", None if stored == "step" else e.shape, e.meta_crc(stored))
        return a, cast if cast not in (None, a.dtype) else None

    def recorded_fingerprint(self, name: str, state: str | None) -> int | None:
        """The fingerprint recorded for a parameter state (``state=None``: a buffer) when it was
        written, or None (converted with ``--no-verify``, or by an older ucp)."""
        e = self._buffers.get(name) if state is None else self._entry(name)
        if e is None:
            return None
        if state == "param" and "param" not in e.states and e.dtype == "float32":
            state = "fp32"  # an fp32 model's weights are stored once, as fp32: the same bits
        value = e.fingerprint(state)
        try:
            return from_hex(value) if value is not None else None
        except ValueError as err:
            raise CorruptCheckpointError(f"{self.url}/{GROUP_META}: {name!r} ({state or 'buffer'}): "
                                         f"{err}; the group metadata is damaged") from err

    def read_buffer(self, name: str) -> torch.Tensor:
        return self.read_array(self.state_array(name, None)[0], None)

    def _entry(self, name: str) -> ArrayEntry:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r} in {self.url} ({len(self._params)} parameters; "
                           "see .names())") from None

    def open_array(self, path: str, shape: tuple[int, ...] | None, meta_crc: int | None = None) -> OpenedArray:
        """The array at ``path``, its metadata checked against the group table (its CRC32C, the
        ``shape``; None: not checked) and against itself (chunks, dtypes). Opened once."""
        with self._lock:
            if path in self._arrays:
                return self._arrays[path]
        where = f"{self.url}/{path}/{GROUP_META}"
        raw = read_array_meta(self.storage, self.url, path, meta_crc)
        try:
            meta = json.loads(raw)
            layout = layout_of(meta)
            arr = None if layout is not None else self._zarr(path)
            if layout is not None:
                np_dtype, ashape, chunks = layout.dtype, layout.shape, layout.chunks
            else:
                np_dtype, ashape, chunks = arr.dtype, tuple(arr.shape), tuple(arr.chunks)
                outer = tuple(getattr(arr, "shards", None) or chunks)
                if len(outer) != len(ashape) or not all(type(c) is int and c >= 1 for c in outer):
                    raise CorruptCheckpointError(f"{where}: shards {list(outer)} are not valid; the "
                                                 "file is damaged, convert the checkpoint again")
            dtype = dtype_from_name((meta.get("attributes") or {}).get("ucp_dtype", ""))
            stored = to_numpy(torch.empty(0, dtype=dtype)).dtype
        except UcpError:  # incl. the store's retries running out: not damage
            raise
        except Exception as e:  # noqa: BLE001 - damaged metadata makes zarr raise all kinds of errors
            raise CorruptCheckpointError(f"{where}: unreadable array metadata ({type(e).__name__}: "
                                         f"{e}); the file is damaged, convert the checkpoint again") from e
        if np_dtype != stored or (shape is not None and ashape != shape) or len(chunks) != len(ashape) \
                or not all(type(c) is int and c >= 1 for c in chunks):
            raise CorruptCheckpointError(f"{where}: array of {np_dtype}{list(ashape)} in chunks {list(chunks)} "
                                         f"does not hold the {dtype}{list(shape or ashape)} the group "
                                         "metadata records; the file is damaged, convert the checkpoint again")
        opened = OpenedArray(path, ashape, chunks, dtype, np_dtype, layout, arr)
        with self._lock:
            return self._arrays.setdefault(path, opened)

    def _zarr(self, path: str) -> Any:
        """An array laid out other than ucp writes, read through zarr."""
        import zarr

        with self._lock:
            if self._store is None:
                self._store = zarr_store(self.storage, read_only=True)
        return zarr.open_array(self._store, path=path, mode="r")

    def read_array(self, a: OpenedArray, region: Sequence[slice] | None) -> torch.Tensor:
        """``region`` (slices; None: all) of an opened array, in its logical dtype. ucp's own
        layouts are read chunk file by chunk file, each chunk checked against its CRC32C."""
        simple = region is None or (len(region) <= len(a.shape) and all(
            isinstance(sl, slice) and sl.step in (None, 1) for sl in region))
        _check_region(self.storage, a, region)
        if a.layout is not None and simple:
            bounds = None if region is None else [
                (lo, max(lo, hi)) for lo, hi, _ in (sl.indices(n) for sl, n in
                                                    itertools.zip_longest(region, a.shape, fillvalue=slice(None)))]
            return from_numpy(self._reader.read(a.path, a.layout, bounds), a.dtype)
        arr = a.zarr if a.zarr is not None else self._zarr(a.path)
        try:
            data = arr[tuple(region) if region is not None else ...]
        except UcpError:  # a missing chunk names itself
            raise
        except ValueError as e:
            bad = _bad_chunk(self.storage, a, arr, region, self._reader)
            if "checksum" in str(e).lower():
                raise ChecksumError(f"{self.url}/{bad or a.path}: CRC32C does not match (the chunk is "
                                    "corrupt); convert the checkpoint again") from e
            if bad is not None:  # e.g. a truncated chunk: zarr fails before any checksum
                raise CorruptCheckpointError(f"{self.url}/{bad}: the chunk is damaged ({e}); convert "
                                             "the checkpoint again") from e
            raise CorruptCheckpointError(f"{self.url}/{a.path}/{GROUP_META} or one of the array's "
                                         f"chunks is damaged ({e}); convert the checkpoint again") from e
        return from_numpy(np.asarray(data), a.dtype)

    def read_chunk(self, a: OpenedArray, idx: Sequence[int]) -> np.ndarray:
        """One inner chunk of an array in ucp's layout, checked against its CRC32C and cut to the
        array's edge (stored dtype). ucp writes every chunk, so a missing one is lost data."""
        assert a.layout is not None
        return self._reader.chunk(a.path, a.layout, idx)


def read_array_meta(storage: Storage, url: str, path: str, meta_crc: int | None) -> bytes:
    """An array's ``zarr.json`` (bounded in size), checked against the CRC32C the group table
    records for it (None: not recorded)."""
    where = f"{url}/{path}/{GROUP_META}"
    try:
        raw = storage.read(f"{path}/{GROUP_META}", max_bytes=MAX_ARRAY_META)
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"{where} is missing (array {path!r} is lost); convert the "
                                     "checkpoint again") from e
    if meta_crc is not None and crc32c(raw) != meta_crc:
        raise ChecksumError(f"{where}: CRC32C does not match the one the group metadata records "
                            "(the array metadata is damaged); convert the checkpoint again")
    return bytes(raw)


def _region_chunks(a: OpenedArray, region: Sequence[slice] | None) -> tuple[list[int], list[int]]:
    """First chunk index and chunk count per dimension of ``region`` (unit-step slices)."""
    bounds = [slice(None)] * len(a.shape) if region is None else list(region)
    first, counts = [], []
    for sl, n, c in zip(bounds, a.shape, a.chunks):
        start, stop, _ = sl.indices(n) if isinstance(sl, slice) else (0, n, 1)
        first.append(start // c)
        counts.append(max(0, -(-stop // c) - start // c))
    return first, counts


def _chunk_key(a: OpenedArray, arr: Any, idx: Sequence[int]) -> str:
    if a.layout is not None:
        return f"{a.path}/{a.layout.locate(idx)[0]}"
    shards = getattr(arr, "shards", None)
    if shards:  # a sharded zarr array: ``idx`` counts inner chunks, the file is their shard's
        idx = [i * c // s for i, c, s in zip(idx, arr.chunks, shards)]
    return f"{a.path}/{arr.metadata.chunk_key_encoding.encode_chunk_key(tuple(idx))}"


def _check_region(storage: Storage, a: OpenedArray, region: Sequence[slice] | None) -> None:
    """Refuses, before anything is allocated, a read whose cost the metadata inflates: zarr
    spends memory per chunk (not per byte) planning a read, so a damaged or hostile array with a
    huge shape cut in tiny chunks could exhaust memory from a tiny file. ucp's chunks hold at
    least tens of KiB unless the whole array is small; and a large read's last file must exist."""
    first, counts = _region_chunks(a, region)
    nchunks = math.prod(counts)
    if nchunks == 0:
        return
    chunk_bytes = math.prod(a.chunks) * a.np_dtype.itemsize
    if nchunks > 1024 and chunk_bytes < 16 * 1024:
        raise CorruptCheckpointError(f"{storage.url}/{a.path}/{GROUP_META}: {nchunks} chunks of {chunk_bytes} "
                                     "bytes is not how ucp chunks an array; the metadata is damaged")
    if nchunks * chunk_bytes > 64 * 2**20:
        key = _chunk_key(a, a.zarr, tuple(f + c - 1 for f, c in zip(first, counts)))
        if not storage.exists(key):
            raise CorruptCheckpointError(f"{storage.url}/{key}: chunk file missing (the array's "
                                         "metadata or its data is damaged); convert the checkpoint again")


def _bad_chunk(storage: Storage, a: OpenedArray, arr: Any, region: Sequence[slice] | None,
               reader: ChunkReader) -> str | None:
    """The first chunk (or shard) file in ``region`` whose stored CRC32Cs do not match its
    bytes, or whose shard index is damaged (to name it)."""
    first, counts = _region_chunks(a, region)
    expected = math.prod(a.chunks) * a.np_dtype.itemsize + 4  # bytes + CRC32C
    for n, offset in enumerate(np.ndindex(*counts)):
        if n == 100_000:  # naming the chunk is a courtesy; do not scan forever
            break
        idx = tuple(f + o for f, o in zip(first, offset))
        if a.layout is not None:  # ucp's layouts: the chunk reader checks every byte it reads
            try:
                reader.chunk(a.path, a.layout, idx)
            except UcpError:
                return _chunk_key(a, arr, idx)
            continue
        key = _chunk_key(a, arr, idx)
        raw = storage.read(key)
        if len(raw) != expected or checksum([memoryview(raw)[:-4]])[0] != int.from_bytes(raw[-4:], "little"):
            return key
    return None


def open_universal(url: str, *, storage_options: Mapping[str, Any] | None = None) -> UniversalCheckpoint:
    """Opens a complete universal checkpoint (``ucp.open``).

    Raises:
        CheckpointNotFoundError: nothing at ``url``.
        CorruptCheckpointError: incomplete or damaged.
    """
    return UniversalCheckpoint(url, storage_options=storage_options)
