"""On-disk metadata of ucp's native format: frozen dataclasses <-> JSON (never pickle).

A committed step directory holds, per rank, ``rank-RRRRR.safetensors`` (that rank's tensors) and
``rank-RRRRR.json`` (a :class:`RankIndex`), and one ``manifest.json`` (a :class:`Manifest`) that
the coordinator writes last. Every JSON document carries ``format_version``.
"""

from __future__ import annotations

import base64
import dataclasses
import struct
from typing import Any, Mapping, Sequence

import crc32c as _crc32c

from ucp.core._errors import CorruptCheckpointError
from ucp.core._records import FileRecord, MeshInfo, field as _field, ints as _ints
from ucp.core._sealed import CHECKSUM, MAX_JSON_BYTES, dumps, load_sealed, seal
from ucp.core._topology import Topology

__all__ = ["FORMAT_VERSION", "MANIFEST_VERSION", "READ_VERSIONS", "CatalogGroup", "FileRecord", "MeshInfo",
           "TensorFragment", "RankIndex", "Manifest", "step_dir", "rank_stem", "parse_step_dir", "dumps",
           "loads", "seal", "CHECKSUM", "BLOCK_BYTES", "SMALL_BLOCK_BYTES", "SMALL_TENSOR_BYTES",
           "block_size", "block_checksums", "pack_crcs", "unpack_crcs",
           "MAX_JSON_BYTES"]

#: The version of the native documents ucp writes. Version 2 adds the manifest's catalog of rank
#: groups and rank indexes that describe a rank by its group's representative
#: (``ucp.native._catalog``), 1 MiB checksum blocks, and checksums packed as base64.
FORMAT_VERSION = 2
#: The versions of native documents this ucp reads (version 1: no catalog, every index whole).
READ_VERSIONS = (1, 2)
MANIFEST_VERSION = FORMAT_VERSION
#: Sizes of the blocks a tensor fragment's ``block_crc32c`` covers, the granularity of partial
#: reads: ``SMALL_BLOCK_BYTES`` for tensors up to ``SMALL_TENSOR_BYTES`` (a partial read of a
#: small tensor stays close to what it needs), ``BLOCK_BYTES`` above (fewer checksums to record).
#: Each fragment records its own size (version 1 saves used 256 KiB for every tensor).
BLOCK_BYTES = 1 << 20
SMALL_BLOCK_BYTES = 256 << 10
SMALL_TENSOR_BYTES = 16 << 20



def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    """The step number of a ``step-NNNNNNNN`` directory name, or None for any other name."""
    if name.startswith("step-") and len(name) == 13 and name[5:].isdigit():
        return int(name[5:])
    return None


def rank_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


def loads(data: bytes, *, what: str) -> dict[str, Any]:
    """A native metadata document (manifest, rank index), its seal and version checked.

    Raises:
        CorruptCheckpointError: too large, not JSON, not an object, or an unsupported version.
        ChecksumError: the content does not match its own checksum.
    """
    return load_sealed(data, what=what, versions=READ_VERSIONS)


def _job(d: Mapping[str, Any], what: str) -> str | None:
    """The optional ``job`` field: the id of the job that wrote the document (absent in
    documents written before ucp recorded it)."""
    job = d.get("job")
    if job is not None and not isinstance(job, str):
        raise CorruptCheckpointError(f"{what}: field 'job' has type {type(job).__name__}")
    return job


@dataclasses.dataclass(frozen=True)
class TensorFragment:
    """One tensor a rank saved: where its bytes are and which region of the global tensor it is.

    ``offsets``/``shape`` give the region of the global tensor (``global_shape``). For plain tensors
    the region is the whole tensor; for a DTensor it comes from the placements, and ``mesh`` indexes
    the rank index's ``meshes``. ``crc32c`` is the checksum of the tensor's own bytes, so a reader
    that fetches one tensor by byte range can verify it without reading the whole file;
    ``block_crc32c`` (tensors larger than one block) holds the checksum of each ``BLOCK_BYTES``
    block of them, so a reader that needs only part of the tensor reads and verifies only the
    blocks that hold that part. ``fingerprint`` (``"<algorithm>:<16 hex digits>"``) is the
    partial fingerprint of the tensor's values at its region of the global tensor
    (:mod:`ucp.core._fingerprint`): the fingerprints of fragments that tile a tensor add up to
    the tensor's, whatever the layout, so a conversion checks its output against them without
    fingerprinting the source again.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    placements: tuple[str, ...] | None = None
    mesh: int | None = None
    crc32c: int | None = None
    block_crc32c: tuple[int, ...] | None = None
    block_bytes: int = BLOCK_BYTES
    fingerprint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"key": self.key, "dtype": self.dtype, "shape": list(self.shape),
                             "global_shape": list(self.global_shape), "offsets": list(self.offsets)}
        if self.crc32c is not None:
            d["crc32c"] = self.crc32c
        if self.block_crc32c is not None:
            d["blocks"] = {"bytes": self.block_bytes, "crc32c": pack_crcs(self.block_crc32c)}
        if self.placements is not None:
            d["placements"], d["mesh"] = list(self.placements), self.mesh
        if self.fingerprint is not None:
            d["fingerprint"] = self.fingerprint
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "fragment") -> TensorFragment:
        shape = _ints(_field(d, "shape", list, what), what)
        gshape = _ints(_field(d, "global_shape", list, what), what)
        offsets = _ints(_field(d, "offsets", list, what), what)
        if not (len(shape) == len(gshape) == len(offsets)) or any(
                o + s > g for o, s, g in zip(offsets, shape, gshape)):
            raise CorruptCheckpointError(f"{what}: region offsets={list(offsets)} shape={list(shape)} "
                                         f"lies outside global shape {list(gshape)}")
        placements = d.get("placements")
        if placements is not None:
            if not (isinstance(placements, list) and all(isinstance(p, str) for p in placements)):
                raise CorruptCheckpointError(f"{what}: placements must be a list of strings")
            placements = tuple(placements)
            _field(d, "mesh", int, what)
        crc = d.get("crc32c")
        if crc is not None and (not isinstance(crc, int) or isinstance(crc, bool)):
            raise CorruptCheckpointError(f"{what}: crc32c must be an integer")
        size, blocks = _blocks(d.get("blocks"), what)
        fp = d.get("fingerprint")
        if fp is not None and not (isinstance(fp, str) and ":" in fp):
            raise CorruptCheckpointError(f"{what}: fingerprint must be a string '<algorithm>:<hex>'")
        return cls(key=_field(d, "key", str, what), dtype=_field(d, "dtype", str, what), shape=shape,
                   global_shape=gshape, offsets=offsets, placements=placements,
                   mesh=d.get("mesh") if placements is not None else None, crc32c=crc,
                   block_crc32c=blocks, block_bytes=size, fingerprint=fp)


def pack_crcs(crcs: Sequence[int]) -> str:
    """CRC32C values as base64 of little-endian uint32s (5.3 characters each in JSON)."""
    return base64.b64encode(struct.pack(f"<{len(crcs)}I", *crcs)).decode("ascii")


def unpack_crcs(text: Any, what: str) -> tuple[int, ...]:
    """The CRC32C values :func:`pack_crcs` wrote; version 1's JSON list of integers too."""
    if isinstance(text, list) and all(type(c) is int and 0 <= c < 2**32 for c in text):
        return tuple(text)
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else b"?"
    except ValueError as e:
        raise CorruptCheckpointError(f"{what}: checksums are not base64 ({e})") from e
    if len(raw) % 4:
        raise CorruptCheckpointError(f"{what}: packed checksums must be 4 bytes each")
    return struct.unpack(f"<{len(raw) // 4}I", raw)


def _blocks(blocks: Any, what: str) -> tuple[int, tuple[int, ...] | None]:
    """A fragment's block size and checksums (None: none recorded)."""
    if blocks is None:
        return BLOCK_BYTES, None
    size = blocks.get("bytes") if isinstance(blocks, dict) else None
    if type(size) is not int or not 4096 <= size <= 1 << 30 or size & (size - 1):
        raise CorruptCheckpointError(f"{what}: blocks must be {{'bytes': power of two, 'crc32c': ...}}")
    return size, unpack_crcs(blocks.get("crc32c"), f"{what} blocks")


def block_size(nbytes: int) -> int:
    """The block size of a tensor of ``nbytes`` bytes (see :data:`BLOCK_BYTES`)."""
    return SMALL_BLOCK_BYTES if nbytes <= SMALL_TENSOR_BYTES else BLOCK_BYTES


def block_checksums(data: memoryview, block: int | None = None) -> tuple[int, ...] | None:
    """The CRC32C of each ``block``-byte block of ``data`` (default: :func:`block_size`; None
    when it is one block or less)."""
    block = block or block_size(data.nbytes)
    if data.nbytes <= block:
        return None
    flat = data.cast("B")
    return tuple(_crc32c.crc32c(flat[i:i + block]) for i in range(0, flat.nbytes, block))


@dataclasses.dataclass(frozen=True)
class RankIndex:
    """``rank-RRRRR.json``: one rank's saved state structure, fragments and data file record."""

    rank: int
    world_size: int
    step: int
    tree: Any
    fragments: tuple[TensorFragment, ...]
    data: FileRecord
    meshes: tuple[MeshInfo, ...] = ()
    job: str | None = None
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {"format_version": self.format_version, "kind": "ucp-rank-index", "rank": self.rank,
             "world_size": self.world_size, "step": self.step, "tree": self.tree,
             "fragments": [f.to_dict() for f in self.fragments], "data": self.data.to_dict(),
             "meshes": [m.to_dict() for m in self.meshes]}
        return d if self.job is None else {**d, "job": self.job}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "rank index") -> RankIndex:
        frags = _field(d, "fragments", list, what)
        meshes = tuple(MeshInfo.from_dict(m, f"{what} mesh {i}")
                       for i, m in enumerate(_field(d, "meshes", list, what)))
        fragments = tuple(TensorFragment.from_dict(f, f"{what} fragment {i}") for i, f in enumerate(frags))
        for f in fragments:
            if f.mesh is not None and not 0 <= f.mesh < len(meshes):
                raise CorruptCheckpointError(f"{what}: fragment {f.key!r} names mesh {f.mesh}, "
                                             f"but only {len(meshes)} meshes are recorded")
        return cls(rank=_field(d, "rank", int, what), world_size=_field(d, "world_size", int, what),
                   step=_field(d, "step", int, what), tree=d.get("tree"), fragments=fragments,
                   data=FileRecord.from_dict(_field(d, "data", dict, what), what), meshes=meshes,
                   job=_job(d, what))


@dataclasses.dataclass(frozen=True)
class CatalogGroup:
    """Ranks that saved the same layout (``ucp.native._catalog``): ``ranks`` as ``[start, stop)``
    runs, ``index`` the lowest of them, whose rank index describes every member."""

    index: int
    ranks: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "ranks": [list(r) for r in self.ranks]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "catalog group") -> CatalogGroup:
        runs = _field(d, "ranks", list, what)
        if not runs or not all(isinstance(r, list) and len(r) == 2 for r in runs):
            raise CorruptCheckpointError(f"{what}: ranks must be a list of [start, stop) pairs")
        ranks = tuple((a, b) for a, b in (_ints(r, what) for r in runs))
        index = _field(d, "index", int, what)
        if any(a >= b for a, b in ranks) or index != min(a for a, _ in ranks):
            raise CorruptCheckpointError(f"{what}: runs {runs[:4]} are empty or do not start at "
                                         f"the representative rank {index}")
        return cls(index=index, ranks=ranks)


def _catalog(d: Mapping[str, Any], world_size: int, what: str) -> tuple[CatalogGroup, ...] | None:
    """The manifest's catalog, checked to give every rank exactly one group (None if absent)."""
    groups = d.get("catalog")
    if groups is None:
        return None
    if not isinstance(groups, list):
        raise CorruptCheckpointError(f"{what}: catalog must be a list of groups")
    out = tuple(CatalogGroup.from_dict(g, f"{what} catalog group {i}") for i, g in enumerate(groups))
    runs = sorted(r for g in out for r in g.ranks)
    if [0, *(b for _, b in runs)] != [*(a for a, _ in runs), world_size]:
        raise CorruptCheckpointError(f"{what}: the catalog's groups do not hold each of the "
                                     f"{world_size} ranks exactly once; the manifest is damaged")
    return out


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``manifest.json``: the commit record of one step, written last by the coordinator.

    ``files`` maps every file of the step (relative to the step directory) to its record.
    """

    step: int
    world_size: int
    topology: Topology | None
    files: Mapping[str, FileRecord]
    created: float
    engine: str = "ucp"
    spec: str | None = None
    meshes: tuple[MeshInfo, ...] = ()
    job: str | None = None
    catalog: tuple[CatalogGroup, ...] | None = None
    format_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = {"format_version": self.format_version, "kind": "ucp-manifest", "step": self.step,
             "world_size": self.world_size, "engine": self.engine, "created": self.created,
             "topology": None if self.topology is None else self.topology.to_dict(),
             "files": {k: v.to_dict() for k, v in sorted(self.files.items())},
             "spec": self.spec, "meshes": [m.to_dict() for m in self.meshes]}
        if self.catalog is not None:
            d["catalog"] = [g.to_dict() for g in self.catalog]
        return d if self.job is None else {**d, "job": self.job}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], what: str = "manifest") -> Manifest:
        files = _field(d, "files", dict, what)
        topo = d.get("topology")
        try:
            topology = None if topo is None else Topology.from_dict(topo)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as e:
            raise CorruptCheckpointError(f"{what}: bad topology {str(topo)[:200]}: {e}") from e
        spec = d.get("spec")
        if spec is not None and not isinstance(spec, str):
            raise CorruptCheckpointError(f"{what}: spec must be text")
        meshes = d.get("meshes") or []
        if not isinstance(meshes, list):
            raise CorruptCheckpointError(f"{what}: meshes must be a list")
        step, world_size = _field(d, "step", int, what), _field(d, "world_size", int, what)
        created = _field(d, "created", (int, float), what)
        if not (0 <= step < 10**8 and 1 <= world_size <= 2**24 and abs(created) < 1e15):
            raise CorruptCheckpointError(f"{what}: step {step}, world_size {world_size} or created "
                                         f"{created} is out of range")
        return cls(step=step, world_size=world_size, topology=topology, created=float(created),
                   files={str(k): FileRecord.from_dict(v, f"{what} file {k!r}") for k, v in files.items()},
                   engine=_field(d, "engine", str, what), spec=spec,
                   meshes=tuple(MeshInfo.from_dict(m, f"{what} mesh") for m in meshes),
                   job=_job(d, what), catalog=_catalog(d, world_size, what),
                   format_version=_field(d, "format_version", int, what))
