"""The tensor/pipeline-parallel layout that a DeepSpeed checkpoint records about itself.

Without a UCL spec, a checkpoint saved with tp or pp > 1 is joined from what DeepSpeed wrote:

- **pipeline** (``PipelineModule``): parameter names already carry the global layer index
  (``3.fc.weight``), so each stage's parameters are simply collected; a tied module
  (``tied_modules.<key>.*``) is held by every stage that uses it and read from the first;
- **tensor parallel** (AutoTP): the model file's ``universal_checkpoint_info`` holds an *affine map*
  per parameter: for every tp rank, which strided blocks of the full tensor its shard holds
  (``source``: offset and strides in the full tensor; ``dest``: in the shard) and which ranks hold
  each block. Joining is copying each block back; a block held by several ranks is read once.

No tensor bytes are read here: :class:`MpLayout` says, for each canonical parameter, which
model-parallel ranks hold it under which local name, and :meth:`MpLayout.join` assembles the
pieces the caller read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

import torch

from ucp.core._errors import ConvertError, CorruptCheckpointError

__all__ = ["Block", "AffineMap", "MpLayout", "affine_maps"]


@dataclasses.dataclass(frozen=True)
class Block:
    """A strided block: the same elements seen in the full tensor (``src``) and in a shard (``dst``)."""

    shape: tuple[int, ...]
    src: tuple[int, tuple[int, ...]]  # (offset, strides) in the full tensor
    dst: tuple[int, tuple[int, ...]]  # (offset, strides) in the shard
    holders: frozenset[int]  # tp ranks whose shards hold this block
    scale: float = 1.0  # the shard holds ``full * scale`` (a row-parallel bias divided by tp)


@dataclasses.dataclass(frozen=True)
class AffineMap:
    """How one parameter is spread over the tp ranks (DeepSpeed's affine map, format version 1)."""

    shape: tuple[int, ...]
    shards: Mapping[int, tuple[int, ...]]  # tp rank -> its shard's shape
    blocks: Mapping[int, tuple[Block, ...]]  # tp rank -> the blocks its shard holds

    @classmethod
    def from_dict(cls, entry: Any, where: str) -> "AffineMap":
        """Validate one map entry as DeepSpeed writes it (plain lists and numbers only)."""
        try:
            shape = tuple(int(d) for d in entry["logical_shape"])
            shards, blocks = {}, {}
            for rank, value in entry["ranks"].items():
                shards[int(rank)] = tuple(int(d) for d in value["shard_shape"])
                blocks[int(rank)] = tuple(_block(p) for p in value["pieces"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorruptCheckpointError(f"{where}: a malformed affine map ({type(e).__name__}: {e}); the "
                                         "model file's universal_checkpoint_info is damaged") from e
        amap = cls(shape, shards, blocks)
        amap._check(where)
        return amap

    def _check(self, where: str) -> None:
        """Every block lies inside the full tensor and its shard; the blocks cover the tensor."""
        numel, covered = math.prod(self.shape), 0
        for rank, blocks in self.blocks.items():
            shard = math.prod(self.shards[rank])
            for b in blocks:
                if not (_inside(b.shape, b.src, numel) and _inside(b.shape, b.dst, shard)) or b.scale == 0:
                    raise CorruptCheckpointError(f"{where}: an affine block {b} of tp rank {rank} lies outside "
                                                 f"the tensor {list(self.shape)} or its shard; the map is damaged")
                if min(b.holders, default=-1) == rank:  # count each replicated block once
                    covered += math.prod(b.shape)
        if covered != numel:
            raise CorruptCheckpointError(f"{where}: the affine map's blocks hold {covered} of the {numel} elements "
                                         f"of {list(self.shape)}; the parameter cannot be rebuilt from its shards")

    def readers(self) -> list[int]:
        """The tp ranks whose shards must be read: each block's lowest holder."""
        return sorted({min(b.holders) for blocks in self.blocks.values() for b in blocks
                       if min(b.holders) in self.blocks})

    def join(self, shards: Mapping[int, torch.Tensor], state: str, where: str) -> torch.Tensor:
        """The full tensor from the shards of :meth:`readers` (``state`` decides how a scale applies)."""
        first = next(iter(shards.values()))
        out = torch.empty(math.prod(self.shape), dtype=first.dtype)
        for rank in self.readers():
            flat = shards[rank].reshape(-1)
            if flat.numel() != math.prod(self.shards[rank]):
                raise CorruptCheckpointError(f"{where}: tp rank {rank}'s shard has {flat.numel()} elements, the "
                                             f"affine map says {list(self.shards[rank])}; files of another run?")
            for b in self.blocks[rank]:
                if min(b.holders) != rank:
                    continue
                piece = torch.as_strided(flat, b.shape, b.dst[1], b.dst[0])
                if b.scale != 1.0:
                    piece = _unscale(piece, b.scale, state, where)
                torch.as_strided(out, b.shape, b.src[1], b.src[0]).copy_(piece)
        return out.view(self.shape)


def _block(p: Mapping) -> Block:
    return Block(tuple(int(d) for d in p["shape"]),
                 (int(p["source"][0]), tuple(int(s) for s in p["source"][1])),
                 (int(p["dest"][0]), tuple(int(s) for s in p["dest"][1])),
                 frozenset(int(r) for r in p["locations"]), float(p.get("scale", 1.0)))


def _inside(shape: tuple[int, ...], view: tuple[int, tuple[int, ...]], numel: int) -> bool:
    offset, strides = view
    if len(strides) != len(shape) or offset < 0 or any(s < 0 for s in strides):
        return False
    if math.prod(shape) == 0:
        return True
    return offset + sum((n - 1) * s for n, s in zip(shape, strides)) < numel


def _unscale(piece: torch.Tensor, scale: float, state: str, where: str) -> torch.Tensor:
    if state not in ("param", "fp32"):
        # Adam's moments of a scaled shard live in the shard's coordinates together with lr and eps;
        # rescaling them alone would resume on another trajectory (DeepSpeed refuses this too).
        raise ConvertError(f"{where}: {state} of a parameter that DeepSpeed stores scaled by {scale} on each tp "
                           "rank cannot be converted exactly; convert with a UCL spec (--spec) that says so")
    return piece / scale


def affine_maps(info: Any, names: list[str], where: str) -> dict[str, AffineMap]:
    """Each of ``names`` whose pattern has an affine map in ``universal_checkpoint_info``.

    Raises:
        ConvertError: DeepSpeed marked a parameter as unsupported, or the map's version is newer.
    """
    if not isinstance(info, Mapping):
        return {}
    unsupported = info.get("autotp_unsupported_parameter_patterns") or {}
    section = info.get("affine_map") or {}
    if section and section.get("version") != 1:
        raise ConvertError(f"{where}: affine map version {section.get('version')!r}; this reader knows version "
                           "1 (DeepSpeed 0.19); convert with a UCL spec (--spec) instead")
    exact, general = {}, []
    for pattern, entry in (section.get("params") or {}).items():
        # DeepSpeed writes one ``^<escaped name>$`` per parameter: look those up by name, so a
        # model of many thousands of parameters is not matched against every pattern
        m = re.fullmatch(r"\^(.*)\$", pattern)
        plain = m and re.sub(r"\\(.)", r"\1", m[1])
        if plain and re.escape(plain) == m[1]:
            exact[plain] = entry
        else:
            general.append((pattern, entry))
    maps = {}
    for name in names:
        for pattern, reason in unsupported.items():
            if re.search(pattern, name):
                raise ConvertError(f"{where}: DeepSpeed records {name!r} as not convertible ({reason}); "
                                   "convert with a UCL spec (--spec) that describes it")
        entry = exact.get(name) or next((e for p, e in general if re.search(p, name)), None)
        if entry is not None:
            maps[name] = AffineMap.from_dict(entry, f"{where}: {name!r}")
    return maps


@dataclasses.dataclass(frozen=True)
class MpLayout:
    """Canonical parameters of a tp/pp checkpoint and where each one's pieces are.

    Attributes:
        tp, pp: the saving run's sizes (mp rank = pp stage * tp + tp rank).
        local: canonical name -> the pipeline stage that holds it (the first, for a tied module).
        maps: canonical name -> its affine map over the tp ranks (tp > 1).
    """

    tp: int
    pp: int
    local: Mapping[str, int]
    maps: Mapping[str, AffineMap]

    @classmethod
    def derive(cls, tp: int, pp: int, names_of: Callable[[int], list[str]], info: Any, where: str) -> "MpLayout":
        """Collect every stage's parameters; with tp > 1, require an affine map for each.

        Args:
            names_of: mp rank -> its parameter names. info: ``universal_checkpoint_info`` or None.

        Raises:
            ConvertError: tp > 1 and some parameter's layout is not recorded (a spec is needed).
        """
        local: dict[str, int] = {}
        for stage in range(pp):
            for name in names_of(stage * tp):
                local.setdefault(name, stage)
        maps = affine_maps(info, list(local), where) if tp > 1 else {}
        missing = [n for n in local if tp > 1 and n not in maps]
        if missing:
            raise ConvertError(f"{where}: saved with tp={tp}, but the checkpoint does not record how "
                               f"{len(missing)} parameter(s) are cut (e.g. {missing[0]!r}: no "
                               "universal_checkpoint_info affine map); pass a UCL spec (--spec)")
        return cls(tp, pp, local, maps)

    def shape(self, name: str, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.maps[name].shape if name in self.maps else local_shape

    def mp_ranks(self, name: str) -> list[int]:
        """The model-parallel ranks whose pieces :meth:`join` needs."""
        stage = self.local[name]
        tps = self.maps[name].readers() if name in self.maps else [0]
        return [stage * self.tp + t for t in tps]

    def join(self, name: str, pieces: Mapping[int, torch.Tensor], state: str, where: str) -> torch.Tensor:
        """The full tensor from the pieces of :meth:`mp_ranks` (keyed by mp rank)."""
        if name not in self.maps:
            return next(iter(pieces.values()))
        base = self.local[name] * self.tp
        return self.maps[name].join({mp - base: t for mp, t in pieces.items()}, state, where)
