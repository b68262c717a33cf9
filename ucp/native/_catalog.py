"""The manifest's catalog: ranks grouped by the layout of what they saved.

Thousands of ranks save the same structure: every rank of a pipeline stage holds the same
parameters, as DTensors on the same mesh, cut the same way; only their regions (which follow from
the placements and the rank's place in the mesh) and their checksums differ. The ranks exchange
the digest of their layout when the step is claimed: the lowest rank of each layout, its
*representative*, writes its whole index, every other rank only what differs (a member index);
the coordinator records the groups in the manifest. A reader then learns every rank's fragments
from one rank index per group and reads another rank's index only when it reads that rank's
bytes: no O(world) reads on a resuming rank.

Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

from ucp.core._errors import CorruptCheckpointError
from ucp.core._records import FileRecord, field as _field
from ucp.core._stfile import dtype_from_name
from ucp.native._meta import (BLOCK_BYTES, FORMAT_VERSION, SMALL_BLOCK_BYTES, SMALL_TENSOR_BYTES, MeshInfo,
                              RankIndex, TensorFragment, pack_crcs, unpack_crcs)
from ucp.resharder._read import runs

__all__ = ["Representative", "representative", "layout_digest", "tree_digest", "group_ranks",
           "dtensor_region", "shard_owners", "member_doc", "index_from_doc", "MAX_GROUPS"]

#: More groups than this and the catalog would not save a reader much: none is written.
MAX_GROUPS = 1024


def _skeleton(tree: Any) -> Any:
    """The saved tree with numbers dropped: what a reader learns from a representative's tree
    (tensor keys, structure, parameter names in ``param_groups``) must hold for every member;
    numbers (hyper-parameters, counters) are read from the rank that is asked for them."""
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_skeleton(v) for v in tree]
    return tree if isinstance(tree, str) else None


def layout_digest(tree: Any, fragments: Sequence[TensorFragment], meshes: Sequence[MeshInfo]) -> str:
    """The digest of what a rank saved, up to what differs between ranks of one layout.

    DTensor fragments count by key, dtype, global shape, placements and mesh (their region
    follows from those and the rank); plain tensors by key, dtype and shape.

    Called by every rank while saving; rank 0 groups the ranks by it (:func:`group_ranks`).
    """
    # a mesh by its index, the meshes once: a stage's mesh lists hundreds of ranks
    tensors = [[f.key, f.dtype, list(f.global_shape), list(f.placements), f.mesh]
               if f.placements is not None else [f.key, f.dtype, list(f.shape)] for f in fragments]
    doc = {"tree": _skeleton(tree), "tensors": tensors, "meshes": [m.to_dict() for m in meshes]}
    raw = json.dumps(doc, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]  # members trust it: no CRC collisions


def group_ranks(statuses: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """The catalog groups of a commit: ``[{"index": representative, "ranks": [[a, b], ...]}]``,
    or None when a rank sent no digest or there are more than :data:`MAX_GROUPS` groups.

    Called by the coordinator only, on the gathered statuses.
    """
    by_digest: dict[str, list[int]] = {}
    for s in statuses:
        digest = s.get("layout")
        if not isinstance(digest, str):
            return None
        by_digest.setdefault(digest, []).append(int(s["rank"]))
    if len(by_digest) > MAX_GROUPS:
        return None
    groups = [{"index": min(ranks), "ranks": [list(r) for r in runs(sorted(ranks))]}
              for ranks in by_digest.values()]
    return sorted(groups, key=lambda g: g["index"])


def dtensor_region(global_shape: Sequence[int], placements: Sequence[str], mesh_shape: Sequence[int],
                   coords: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, shape) of the local piece at mesh ``coords`` of a DTensor with Shard/Replicate
    ``placements``: each ``S(d)`` cuts the piece left by the mesh dims before it as
    ``torch.chunk`` does (DTensor's own rule)."""
    lo, size = [0] * len(global_shape), list(global_shape)
    for p, n, k in zip(placements, mesh_shape, coords):
        if p.startswith("S("):
            d = int(p[2:-1])
            chunk = -(-size[d] // n)
            start, stop = min(size[d], k * chunk), min(size[d], (k + 1) * chunk)
            lo[d], size[d] = lo[d] + start, stop - start
    return tuple(lo), tuple(size)


def shard_owners(frag: TensorFragment,
                 mesh: MeshInfo) -> Iterator[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """``(rank, offsets, shape)`` of one rank per distinct region of a DTensor saved on
    ``mesh`` (coordinate 0 on the dims it is replicated over)."""
    axes = [range(n) if p.startswith("S(") else range(1) for p, n in zip(frag.placements or (), mesh.shape)]
    strides = [1] * len(mesh.shape)
    for i in range(len(mesh.shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * mesh.shape[i + 1]
    for coords in itertools.product(*axes):
        rank = mesh.ranks[sum(c * s for c, s in zip(coords, strides))]
        yield (rank, *dtensor_region(frag.global_shape, frag.placements or (), mesh.shape, coords))


@dataclasses.dataclass(frozen=True)
class Representative:
    """The rank whose index describes a saving rank: the lowest rank of its layout ``layout``;
    ``same_tree``: their saved trees are equal, numbers included."""

    rank: int
    layout: str
    same_tree: bool


def representative(every: Sequence[Mapping[str, Any]], rank: int) -> Representative:
    """Rank ``rank``'s representative among every rank's ``{"layout", "tree"}`` digests.

    Called by every rank on the digests all ranks exchanged before writing their indexes.
    """
    mine = every[rank]
    rep = next(i for i, e in enumerate(every) if e["layout"] == mine["layout"])
    return Representative(rep, mine["layout"], every[rep]["tree"] == mine["tree"])


def tree_digest(tree: Any) -> str:
    """The digest of a saved tree, numbers included (a member whose tree is its
    representative's does not write it again)."""
    raw = json.dumps(tree, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


def member_doc(index: RankIndex, like: Representative) -> dict[str, Any]:
    """The version 2 rank index of a rank that saved the layout of rank ``like.rank`` (its
    group's representative): only what differs from it, its checksums, data record and (unless
    ``like.same_tree``) its tree. :func:`index_from_doc` rebuilds the whole index."""
    blocks = [c for f in index.fragments for c in f.block_crc32c or ()]
    d: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": "ucp-rank-index",
                         "rank": index.rank, "world_size": index.world_size, "step": index.step,
                         "like": like.rank,
                         "layout": like.layout, "data": index.data.to_dict(),
                         "crc32c": pack_crcs([f.crc32c or 0 for f in index.fragments]),
                         "blocks": {"bytes": BLOCK_BYTES, "small": SMALL_BLOCK_BYTES,
                                    "small_tensors": SMALL_TENSOR_BYTES, "crc32c": pack_crcs(blocks)}}
    if all(f.fingerprint is not None for f in index.fragments) and index.fragments:
        d["fingerprints"] = [f.fingerprint for f in index.fragments]
    if not like.same_tree:
        d["tree"] = index.tree
    return d if index.job is None else {**d, "job": index.job}


def index_from_doc(doc: Mapping[str, Any], *, what: str, rep: Callable[[int], RankIndex]) -> RankIndex:
    """The rank index a document holds: a whole one, or a member's (``"like"``), completed
    from its representative ``rep(like)``, whose layout must be the one the member recorded.

    Raises:
        CorruptCheckpointError: the document is damaged or does not fit its representative.
    """
    if "like" not in doc:
        return RankIndex.from_dict(doc, what)
    rank, like = _field(doc, "rank", int, what), _field(doc, "like", int, what)
    if not 0 <= like < rank:
        raise CorruptCheckpointError(f"{what}: its representative rank {like} is not a lower rank")
    base = rep(like)
    if layout_digest(base.tree, base.fragments, base.meshes) != doc.get("layout"):
        raise CorruptCheckpointError(f"{what}: rank {rank} did not save the layout of rank {like}, "
                                     "which its index names; the step is inconsistent")
    crcs = unpack_crcs(doc.get("crc32c"), what)
    sizes = [_field(doc, "blocks", dict, what).get(k) for k in ("bytes", "small", "small_tensors")]
    blocks = unpack_crcs(doc["blocks"].get("crc32c"), what)
    if len(crcs) != len(base.fragments) or not all(type(n) is int and n >= 4096 for n in sizes):
        raise CorruptCheckpointError(f"{what}: {len(crcs)} checksums for the {len(base.fragments)} "
                                     f"tensors of rank {like}, or bad block sizes {sizes}")
    prints = doc.get("fingerprints", [None] * len(crcs))
    if not (isinstance(prints, list) and len(prints) == len(crcs)
            and all(p is None or isinstance(p, str) and ":" in p for p in prints)):
        raise CorruptCheckpointError(f"{what}: its fingerprints are not one '<algorithm>:<hex>' per tensor "
                                     f"of rank {like}")
    frags, used = [], 0
    for f, crc, fp in zip(base.fragments, crcs, prints):
        offsets, shape = f.offsets, f.shape
        if f.placements is not None:
            offsets, shape = _member_region(f, base.meshes[f.mesh], rank, what)
        nbytes = math.prod(shape) * dtype_from_name(f.dtype).itemsize
        size = sizes[1] if nbytes <= sizes[2] else sizes[0]
        n = -(-nbytes // size)
        n = n if n > 1 else 0
        frags.append(dataclasses.replace(f, offsets=offsets, shape=shape, crc32c=crc, fingerprint=fp,
                                         block_bytes=size, block_crc32c=blocks[used:used + n] if n else None))
        used += n
    if used != len(blocks):
        raise CorruptCheckpointError(f"{what}: {len(blocks)} block checksums, its tensors have {used}")
    tree = doc["tree"] if "tree" in doc else base.tree
    return RankIndex(rank=rank, world_size=_field(doc, "world_size", int, what),
                     step=_field(doc, "step", int, what), tree=tree, fragments=tuple(frags),
                     data=FileRecord.from_dict(_field(doc, "data", dict, what), what), meshes=base.meshes,
                     job=doc.get("job") if isinstance(doc.get("job"), str) else None)


def _member_region(f: TensorFragment, mesh: MeshInfo, rank: int,
                   what: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where ``rank``'s piece of a DTensor its representative saved on ``mesh`` lies."""
    try:
        flat = mesh.ranks.index(rank)
    except ValueError:
        raise CorruptCheckpointError(f"{what}: rank {rank} is not in the mesh of {f.key!r}") from None
    coords = []
    for n in reversed(mesh.shape):
        flat, c = divmod(flat, n)
        coords.append(c)
    return dtensor_region(f.global_shape, f.placements or (), mesh.shape, coords[::-1])
