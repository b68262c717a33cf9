"""Where each parameter's bytes lie in a DeepSpeed checkpoint (file names, flat partitions, padding).

This module turns the unpickled structure of a checkpoint's files (see ``_files``) into a
per-parameter plan: for one model-parallel rank, which data-parallel ranks hold which element range
of each parameter, in which flat tensor. No tensor bytes are read here. ``docs/formats/deepspeed.md``
describes the on-disk layout this code follows.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping

import torch

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError, UnsafeInputError
from ._files import TensorRef
from ._moe import (EXPERT_FILE, data_before_expert, expert_ranks, expert_weights, global_expert_name,
                   local_expert_count)
from ._pipe import layer_weights

__all__ = ["CheckpointFiles", "Piece", "ParamPlan", "MpPlan", "discover", "plan_mp_rank"]

# DeepSpeed's ZeRO-1/2 optimizers pad every flat group to a multiple of this factor times the
# data-parallel size (``nccl_start_alignment_factor``; 2 elements = 4 bytes of fp16/bf16).
ZERO12_ALIGN_FACTOR = 2

_MODEL = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_ZERO3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
_OPTIM = re.compile(r"(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt")
_LAYER = re.compile(r"layer_(\d+)(?:-(.+))?-model_states\.pt")
_EXPP_OPTIM = re.compile(r"expp_rank_\d+_mp_rank_\d+_optim_states\.pt")
_TAG = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclasses.dataclass(frozen=True)
class CheckpointFiles:
    """The recognised files of one checkpoint tag directory."""

    tag_dir: str
    tag: str
    model: dict[int, str]  # mp rank -> mp_rank_XX_model_states.pt (ZeRO 0/1/2, pipeline)
    zero3_model: dict[tuple[int, int], str]  # (dp, mp) -> zero_pp_rank_D_mp_rank_XX_model_states.pt
    optim: dict[tuple[int, int], str]  # (dp, mp) -> *zero_pp_rank_D_mp_rank_XX_optim_states.pt
    layers: dict[tuple[int, str], str]  # (layer, rank suffix such as "model_00") -> layer file
    experts: dict[tuple[int, int, int], str] = dataclasses.field(default_factory=dict)  # (moe layer, expert, mp)


def _read_latest(root: str) -> str:
    latest = os.path.join(root, "latest")
    try:
        with open(latest, encoding="utf-8") as f:
            tag = f.read(4096).strip()
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{root}: no DeepSpeed checkpoint here (no 'latest' file and no "
                                      "*_model_states.pt); pass the save directory or a tag directory, "
                                      "or give tag=...") from e
    return tag


def discover(path: str | os.PathLike, tag: str | None) -> CheckpointFiles:
    """Find the tag directory (``tag``, else the ``latest`` file, else ``path`` itself) and its files.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``path``.
        UnsafeInputError: the tag would leave ``path``.
        ConvertError: the directory holds a layout this reader does not handle (MoE expert files).
    """
    root = os.fspath(path)
    if not os.path.isdir(root):
        raise CheckpointNotFoundError(f"{root}: no such directory; pass a DeepSpeed save directory")
    if tag is None and not os.path.exists(os.path.join(root, "latest")) and _has_model_files(root):
        tag_dir, tag = root, os.path.basename(os.path.normpath(root))
    else:
        tag = _read_latest(root) if tag is None else tag
        if not _TAG.fullmatch(tag) or tag in (".", ".."):
            raise UnsafeInputError(f"{root}: checkpoint tag {tag!r} is not a plain directory name; fix the "
                                   "'latest' file or pass tag=... explicitly")
        tag_dir = os.path.join(root, tag)
        if not os.path.isdir(tag_dir):
            raise CheckpointNotFoundError(f"{tag_dir}: tag directory not found (named by {root}/latest or "
                                          "tag=...); check the tag")
    return _classify(tag_dir, tag)


def _has_model_files(d: str) -> bool:
    return any(n.endswith("model_states.pt") for n in os.listdir(d))


def _classify(tag_dir: str, tag: str) -> CheckpointFiles:
    model, zero3_model, optim, layers, experts = {}, {}, {}, {}, {}
    for name in sorted(os.listdir(tag_dir)):
        full = os.path.join(tag_dir, name)
        if _EXPP_OPTIM.fullmatch(name):
            raise ConvertError(f"{full}: a DeepSpeed MoE checkpoint saved without ZeRO (whole optimizer per "
                               "expert-parallel rank) is not supported; save with ZeRO stage 1 or 2")
        if m := EXPERT_FILE.fullmatch(name):
            experts[(int(m[1] or -1), int(m[2]), int(m[3]))] = full
        elif m := _MODEL.fullmatch(name):
            model[int(m[1])] = full
        elif m := _ZERO3_MODEL.fullmatch(name):
            zero3_model[(int(m[1]), int(m[2]))] = full
        elif m := _OPTIM.fullmatch(name):
            key = (int(m[1]), int(m[2]))
            if key in optim:
                raise CorruptCheckpointError(f"{full}: a second optimizer file for dp rank {key[0]}, mp rank "
                                             f"{key[1]} (also {optim[key]}); remove the stale one")
            optim[key] = full
        elif m := _LAYER.fullmatch(name):
            layers[(int(m[1]), m[2] or "")] = full
    if not model and not zero3_model:
        raise CheckpointNotFoundError(f"{tag_dir}: no mp_rank_XX_model_states.pt or zero_pp_rank_D_mp_rank_XX_"
                                      "model_states.pt file; this is not a DeepSpeed checkpoint directory")
    return CheckpointFiles(tag_dir, tag, model, zero3_model, optim, layers, experts)


@dataclasses.dataclass(frozen=True)
class Piece:
    """``count`` elements of one data-parallel rank's flat tensor, and where they go in the parameter."""

    dp_rank: int
    src_start: int
    count: int
    dst_start: int


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    """How to assemble one parameter of one model-parallel rank."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the model (low-precision) dtype
    frozen: bool
    group: int | None  # optimizer param group
    slot: int | None  # index of the flat (sub-)group in the optimizer files holding it
    pieces: tuple[Piece, ...] = ()  # where the states kept in flat partitions are
    flat_states: tuple[str, ...] = ()  # states read through ``pieces``
    whole: Mapping[str, TensorRef] = dataclasses.field(default_factory=dict)  # states saved as whole tensors

    @property
    def states(self) -> tuple[str, ...]:
        return tuple(self.whole) + tuple(s for s in self.flat_states if s not in self.whole)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass
class MpPlan:
    """Everything known about one model-parallel rank: parameters in model order, buffers, sources."""

    mp_rank: int
    stage: int
    dp_size: int
    params: OrderedDict[str, ParamPlan]
    aliases: dict[str, str]
    buffers: dict[str, TensorRef]
    optim: list[dict]  # per dp rank: the ``optimizer_state_dict`` of its optimizer file
    optim_paths: list[str]
    slot_keys: list[Any]  # per slot: its key in the base optimizer's ``state``
    frozen_frags: list[dict[str, TensorRef]]  # ZeRO-3: per dp rank, frozen parameter fragments
    param_groups: list[dict]
    steps: list[Any]

    def flat_ref(self, dp_rank: int, slot: int, state: str) -> TensorRef:
        """The flat tensor of ``state`` in data-parallel rank ``dp_rank``'s file for flat group ``slot``."""
        osd = self.optim[dp_rank]
        if state == "fp32":
            key = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"
            return osd[key][slot]
        state_dict = _slot_state(osd, self.stage, slot, self.slot_keys[slot])
        return state_dict[state]


def _slot_state(osd: Mapping, stage: int, slot: int, key: Any) -> Mapping:
    if stage == 3:
        return osd["optimizer_state_dict"]["state"].get(key, {})
    base = osd["base_optimizer_state"]
    if isinstance(base, list):  # "elastic" checkpoints: one lean state dict per group
        return base[slot]
    return base["state"].get(key, {})


def _need(d: Mapping, key: str, path: str) -> Any:
    try:
        return d[key]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(f"{path}: missing key {key!r}; this file is not a complete DeepSpeed "
                                     "checkpoint file (re-save it)") from None


def _numel(shape: Iterable[int]) -> int:
    dims = [int(s) for s in shape]
    if any(d < 0 for d in dims):
        raise ValueError(f"negative dimension in shape {dims}")
    return math.prod(dims)


def _flat_states(osd: Mapping, stage: int, slot: int, key: Any) -> tuple[str, ...]:
    """Names of the element-wise optimizer states of a flat group (1-D tensors, e.g. exp_avg)."""
    st = _slot_state(osd, stage, slot, key)
    return tuple(k for k, v in st.items() if isinstance(v, TensorRef) and len(v.shape) == 1)


def _model_dtype(model: Mapping, trainable: Iterable[str]) -> torch.dtype:
    module = model.get("module")
    if isinstance(module, Mapping):
        for name in trainable:
            ref = module.get(name)
            if isinstance(ref, TensorRef) and ref.dtype.is_floating_point:
                return ref.dtype
    cfg = model.get("ds_config") or {}
    for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        section = cfg.get(key) if isinstance(cfg, Mapping) else None
        if isinstance(section, Mapping) and section.get("enabled") is True:
            return dtype
    return torch.float32


def _order(module: Any, names: Iterable[str]) -> list[str]:
    """Parameter names in the model's own order (its state dict), then any the module lacks."""
    names = list(names)
    wanted = set(names)
    first = [k for k in module if k in wanted] if isinstance(module, Mapping) else []
    seen = set(first)
    return first + [n for n in names if n not in seen]


def _zero12_group(mp: int, g: int, shapes: Mapping, paddings: list[int] | None, dp: int,
                  refs: list[TensorRef]) -> dict[str, tuple[Piece, ...]]:
    """Pieces of every parameter of ZeRO-1/2 flat group ``g`` (``refs``: each rank's fp32 partition)."""
    names = list(shapes)
    paddings = list(paddings) if paddings is not None else [0] * len(names)
    if len(paddings) != len(names):
        raise CorruptCheckpointError(f"{refs[0].path}: group {g} lists {len(paddings)} alignment paddings for "
                                     f"{len(names)} parameters; the checkpoint is inconsistent")
    padded_total = sum(_numel(shapes[n]) + p for n, p in zip(names, paddings))
    align = ZERO12_ALIGN_FACTOR * dp
    part = math.ceil(padded_total / align) * align // dp
    for r, ref in enumerate(refs):
        real = min(max(padded_total - r * part, 0), part)
        if not real <= ref.numel <= part:
            raise CorruptCheckpointError(
                f"{ref.path}: fp32 partition of group {g} has {ref.numel} elements; expected {real}..{part} "
                f"for {padded_total} elements over {dp} ranks (mp rank {mp}); the file does not belong to "
                "this checkpoint or the layout changed")
    plans, offset = {}, 0
    for name, pad in zip(names, paddings):
        n = _numel(shapes[name])
        pieces = []
        for r in range(dp):
            lo, hi = max(offset, r * part), min(offset + n, (r + 1) * part)
            if lo < hi:
                pieces.append(Piece(r, lo - r * part, hi - lo, lo - offset))
        plans[name] = tuple(pieces)
        offset += n + pad
    return plans


def _zero3_group(mp: int, sg: int, shapes: Mapping, dp: int, refs: list[TensorRef]) -> dict[str, tuple[Piece, ...]]:
    """Pieces of every parameter of ZeRO-3 sub-group ``sg``: each parameter split in ``dp`` padded parts."""
    plans, local = {}, 0
    for name, shape in shapes.items():
        n = _numel(shape)
        q = math.ceil(n / dp)
        plans[name] = tuple(Piece(r, local, min(q, n - r * q), r * q) for r in range(dp) if n - r * q > 0)
        local += q
    for ref in refs:
        if ref.numel != local:
            raise CorruptCheckpointError(
                f"{ref.path}: fp32 partition of sub-group {sg} has {ref.numel} elements; its parameters need "
                f"{local} per rank over {dp} ranks (mp rank {mp}); the file does not belong to this checkpoint")
    return plans


def _dp_files(files: CheckpointFiles, table: Mapping[tuple[int, int], str], mp: int, dp: int, what: str) -> list[str]:
    """The ``dp`` files of mp rank ``mp`` in ``table``, or an error naming what is missing or extra."""
    have = {d: p for (d, m), p in table.items() if m == mp}
    missing = [d for d in range(dp) if d not in have]
    if missing:
        example = next(iter(have.values()), None)
        names = [re.sub(r"zero_pp_rank_\d+", f"zero_pp_rank_{d}", os.path.basename(example)) if example
                 else f"dp rank {d}" for d in missing]
        raise CheckpointNotFoundError(
            f"{files.tag_dir}: missing {what} file(s) {', '.join(names)} (mp rank {mp}, {dp} data-parallel "
            "ranks expected); some rank did not finish saving, copy the missing files or use another tag")
    extra = sorted(set(have) - set(range(dp)))
    if extra:
        raise CorruptCheckpointError(
            f"{have[extra[0]]}: {what} file for dp rank {extra[0]}, but the checkpoint was saved by {dp} "
            "data-parallel ranks; files of another run are mixed in, remove them")
    return [have[d] for d in range(dp)]


def _counts(osd: Mapping, path: str) -> list[int]:
    """Each param group's partition count (MoE expert groups: the expert-data-parallel size)."""
    count = _need(osd, "partition_count", path)
    counts = list(count) if isinstance(count, (list, tuple)) else [count]
    if not counts or not all(type(c) is int and 0 < c <= 1 << 20 for c in counts) \
            or any(max(counts) % c for c in counts):
        raise CorruptCheckpointError(f"{path}: partition counts {counts} are not a data-parallel layout; the "
                                     "file is damaged")
    return counts


def _dp_size(osd: Mapping, path: str) -> int:
    """The data-parallel size: the largest partition count (expert groups use a divisor of it)."""
    return max(_counts(osd, path))


def _load_optim(load, paths: list[str], dp: int) -> list[dict]:
    osds = []
    for path in paths:
        osd = _need(load(path), "optimizer_state_dict", path)
        if _dp_size(osd, path) != dp:
            raise CorruptCheckpointError(f"{path}: saved with {_dp_size(osd, path)} data-parallel ranks, but "
                                         f"{paths[0]} with {dp}; files of different runs are mixed, re-save")
        osds.append(osd)
    return osds


def _steps(osd: Mapping, stage: int, slot_keys: list[Any]) -> list[Any]:
    if stage != 3 and isinstance(osd.get("base_optimizer_state"), list):
        return [osd.get("base_optimizer_state_step")] * len(slot_keys)
    return [_slot_state(osd, stage, i, k).get("step") for i, k in enumerate(slot_keys)]


def plan_mp_rank(files: CheckpointFiles, mp: int, load) -> MpPlan:
    """Plan every parameter of model-parallel rank ``mp``; ``load(path)`` gives a file's structure.

    Raises:
        CheckpointNotFoundError: a rank's file is missing.
        CorruptCheckpointError: files disagree with each other or with the layout rules.
        ConvertError: a layout this reader does not handle.
    """
    if files.zero3_model:
        return _plan_zero3(files, mp, load)
    if mp not in files.model:
        raise CheckpointNotFoundError(f"{files.tag_dir}: missing mp_rank_{mp:02d}_model_states.pt; copy it "
                                      "from the run that saved this checkpoint")
    path = files.model[mp]
    model = load(path)
    if not any(m == mp for (_, m) in files.optim):
        return _plan_zero0(mp, path, model)
    return _plan_zero12(files, mp, path, model, load)


def _plan_zero12(files: CheckpointFiles, mp: int, path: str, model: Mapping, load) -> MpPlan:
    first = next(p for (d, m), p in sorted(files.optim.items()) if m == mp)
    dp = _dp_size(_need(load(first), "optimizer_state_dict", first), first)
    paths = _dp_files(files, files.optim, mp, dp, "optimizer state")
    osds = _load_optim(load, paths, dp)
    osd0, stage = osds[0], int(osds[0].get("zero_stage", 1))
    shapes = _need(model, "param_shapes", path)
    base = _need(osd0, "base_optimizer_state", paths[0])
    paddings = osd0.get("param_alignment_paddings")
    slot_keys, params = [], OrderedDict()
    if not isinstance(model.get("module"), Mapping) and files.layers:  # a PipelineModule: weights per layer
        model = _with_layer_weights(files, mp, model, shapes, load)
    module = model.get("module")
    weights = {**(module if isinstance(module, Mapping) else {}), **expert_weights(files.experts, mp, load)}
    dtype = _model_dtype(model, [n for g in shapes for n in g])
    counts = _counts(osd0, paths[0])
    for g, group_shapes in enumerate(shapes):
        refs = [_need(o, "single_partition_of_fp32_groups", p)[g] for o, p in zip(osds, paths)]
        slot_keys.append(_slot_key(base, g, paths[0]))
        flat = ("fp32",) + _flat_states(osd0, stage, g, slot_keys[g])
        pads = None if paddings is None else paddings[g]
        count = counts[g] if g < len(counts) else dp
        grouped = _group_pieces(mp, g, group_shapes, pads, (dp, count, data_before_expert(model)), refs)
        for name, (shape, pieces) in grouped.items():
            whole = {"param": weights[name]} if name in weights else {}
            params[name] = ParamPlan(name, shape, dtype, False, g, g, pieces, flat, whole)
    return _finish(mp, stage, dp, model, path, params, osds, paths, slot_keys,
                   base["param_groups"] if isinstance(base, Mapping) else [])


def _slot_key(base: Any, g: int, path: str) -> Any:
    """The key of flat group ``g`` in the base optimizer's ``state`` (None for "elastic" files)."""
    if not isinstance(base, Mapping):
        return None
    keys = base["param_groups"][g]["params"]
    if len(keys) != 1:
        raise CorruptCheckpointError(f"{path}: optimizer group {g} holds {len(keys)} tensors; a ZeRO "
                                     "optimizer holds one flat partition per group")
    return keys[0]


def _group_pieces(mp: int, g: int, shapes: Mapping, paddings: list[int] | None, ranks: tuple[int, int, bool],
                  refs: list[TensorRef]) -> dict[str, tuple[tuple[int, ...], tuple[Piece, ...]]]:
    """Name -> (shape, pieces) of flat group ``g``; ``ranks``: (dp, the group's partition count, data
    before expert order). An MoE expert group (partitioned over fewer than dp ranks) comes once per
    expert-parallel rank, its parameters under their global expert ids (see ``_moe``)."""
    dp, count, data_first = ranks
    if count == dp:
        pieces = _zero12_group(mp, g, shapes, paddings, dp, refs)
        return {n: (tuple(s), pieces[n]) for n, s in shapes.items()}
    where = f"{refs[0].path}: group {g}"
    local, out = local_expert_count(list(shapes), where), {}
    if not local:  # a group on fewer ranks holding no experts: a layout this reader does not know
        raise ConvertError(f"{where} is partitioned over {count} of {dp} data-parallel ranks but holds no MoE "
                           "expert parameters (...deepspeed_experts.N...); this layout is not supported")
    for ep_rank in range(dp // count):
        held = expert_ranks(dp, count, ep_rank, where, data_before_expert=data_first)
        pieces = _zero12_group(mp, g, shapes, paddings, count, [refs[r] for r in held])
        for n, s in shapes.items():
            out[global_expert_name(n, ep_rank, local)] = (
                tuple(s), tuple(dataclasses.replace(p, dp_rank=held[p.dp_rank]) for p in pieces[n]))
    return out


def _with_layer_weights(files: CheckpointFiles, mp: int, model: Mapping, shapes: list, load) -> dict:
    """``model`` with a ``module`` made of the pipeline layer files' tensors (see ``_pipe``)."""
    dims = model.get("checkpoint_parallel_dimensions") or {}
    tp = int(dims.get("tp_degree") or 1)
    all_names = set()
    for other in files.model.values():
        all_names.update(n for g in (_need(load(other), "param_shapes", other) or []) for n in g)
    own = {n: tuple(s) for g in shapes for n, s in g.items()}
    weights, extras = layer_weights(files.layers, mp % tp, own, all_names, load)
    return {**model, "module": OrderedDict({**weights, **extras}), "buffer_names": list(extras)}


def _frozen_whole(model: Mapping, trainable: Mapping, aliases: Mapping) -> OrderedDict[str, TensorRef]:
    """ZeRO-0/1/2 frozen parameters: whole tensors (``frozen_param_fragments``, else the module's)."""
    module = model.get("module") if isinstance(model.get("module"), Mapping) else {}
    buffers = set(model.get("buffer_names") or ())
    out = OrderedDict()
    for name, ref in (model.get("frozen_param_fragments") or {}).items():
        out[name] = ref
    for name, ref in module.items():
        if name not in buffers and name not in trainable and name not in aliases and name not in out:
            out[name] = ref
    return out


def _finish(mp: int, stage: int, dp: int, model: Mapping, path: str, params: OrderedDict, osds: list,
            paths: list, slot_keys: list, param_groups: list, frozen_frags: list | None = None) -> MpPlan:
    aliases = dict(model.get("shared_params") or {})
    module = model.get("module") if isinstance(model.get("module"), Mapping) else {}
    if stage < 3:
        dtype = next(iter(params.values())).dtype if params else _model_dtype(model, ())
        for name, ref in _frozen_whole(model, params, aliases).items():
            params[name] = ParamPlan(name, ref.shape, ref.dtype if ref.dtype.is_floating_point else dtype,
                                     True, None, None, whole={"param": ref})
    buffers = {b: module[b] for b in (model.get("buffer_names") or ()) if b in module}
    ordered = OrderedDict((n, params[n]) for n in _order(module, params))
    steps = _steps(osds[0], stage, slot_keys) if osds else []
    return MpPlan(mp, stage, dp, ordered, aliases, buffers, osds, paths, slot_keys, frozen_frags or [],
                  list(param_groups), steps)


def _plan_zero3(files: CheckpointFiles, mp: int, load) -> MpPlan:
    first = next((p for (d, m), p in sorted(files.optim.items()) if m == mp), None)
    if first is None:
        raise CheckpointNotFoundError(f"{files.tag_dir}: ZeRO-3 model files but no optimizer state files for "
                                      f"mp rank {mp}; copy the *_optim_states.pt files too")
    counts = _counts(_need(load(first), "optimizer_state_dict", first), first)
    if len(set(counts)) != 1:
        raise ConvertError(f"{first}: param groups partitioned over different data-parallel sizes ({counts}), "
                           "as MoE expert groups are; MoE under ZeRO-3 is not supported (ZeRO-1/2 is)")
    dp = counts[0]
    paths = _dp_files(files, files.optim, mp, dp, "optimizer state")
    model_paths = _dp_files(files, files.zero3_model, mp, dp, "model state")
    osds = _load_optim(load, paths, dp)
    models = [load(p) for p in model_paths]
    model, path = models[0], model_paths[0]
    shapes = _need(model, "param_shapes", path)
    groups = _need(_need(osds[0], "optimizer_state_dict", paths[0]), "param_groups", paths[0])
    slot_group = [(key, g) for g, pg in enumerate(groups) for key in pg["params"]]
    fp32 = _need(osds[0], "fp32_flat_groups", paths[0])
    if not len(slot_group) == len(fp32) == len(shapes):
        raise CorruptCheckpointError(f"{paths[0]}: {len(fp32)} flat fp32 groups, {len(slot_group)} optimizer "
                                     f"tensors and {len(shapes)} parameter groups in {path}; they must agree")
    dtype = _model_dtype(model, ())
    params = OrderedDict()
    for sg, group_shapes in enumerate(shapes):
        refs = [_need(o, "fp32_flat_groups", p)[sg] for o, p in zip(osds, paths)]
        pieces = _zero3_group(mp, sg, group_shapes, dp, refs)
        flat = ("fp32",) + _flat_states(osds[0], 3, sg, slot_group[sg][0])
        for name, shape in group_shapes.items():
            params[name] = ParamPlan(name, tuple(shape), dtype, False, slot_group[sg][1], sg, pieces[name], flat)
    frags = [dict(m.get("frozen_param_fragments") or {}) for m in models]
    for name, shape in (model.get("frozen_param_shapes") or {}).items():
        n, q = _numel(shape), math.ceil(_numel(shape) / dp)
        for r, fr in enumerate(frags):
            if name not in fr or fr[name].numel != q:
                raise CorruptCheckpointError(f"{model_paths[r]}: frozen parameter {name!r} should have a "
                                             f"fragment of {q} elements; the file is inconsistent")
        pieces = tuple(Piece(r, 0, min(q, n - r * q), r * q) for r in range(dp) if n - r * q > 0)
        params[name] = ParamPlan(name, tuple(shape), frags[0][name].dtype, True, None, None, pieces, ("param",))
    return _finish(mp, 3, dp, model, path, params, osds, paths, [k for k, _ in slot_group], groups, frags)


def _plan_zero0(mp: int, path: str, model: Mapping) -> MpPlan:
    """No ZeRO: whole tensors in the model file; hyper-parameters and step, but no optimizer states."""
    module = _need(model, "module", path)
    if not isinstance(module, Mapping):
        raise ConvertError(f"{path}: a pipeline checkpoint without ZeRO files; its weights are in the "
                           "layer_XX-*-model_states.pt files, which this reader lists but does not consolidate")
    buffers = set(model.get("buffer_names") or ())
    seen, aliases, params = {}, {}, OrderedDict()
    dtype = _model_dtype(model, [n for n in module if n not in buffers])
    for name, ref in module.items():
        if name in buffers:
            continue
        key = (ref.path, ref.storage_offset_bytes, ref.offset, ref.shape)
        if key in seen:  # a tied parameter: torch saved one storage for both names
            aliases[name] = seen[key]
            continue
        seen[key] = name
        whole = {"param": ref, "fp32": ref} if ref.dtype == torch.float32 else {"param": ref}
        params[name] = ParamPlan(name, ref.shape, ref.dtype, False, None, None, whole=whole)
    opt = model.get("optimizer")
    groups = _zero0_groups(opt) if isinstance(opt, Mapping) else []
    plan = _finish(mp, 0, int(model.get("dp_world_size") or 1), {**model, "shared_params": aliases}, path,
                   params, [], [], [], groups)
    plan.steps = [s for s in (_zero0_steps(opt) if isinstance(opt, Mapping) else [])]
    return plan


def _zero0_inner(opt: Mapping) -> Mapping:
    return opt["optimizer_state_dict"] if "optimizer_state_dict" in opt else opt


def _zero0_steps(opt: Mapping) -> list[Any]:
    inner = _zero0_inner(opt)
    return [st.get("step") for st in (inner.get("state") or {}).values()][:1]


def _zero0_groups(opt: Mapping) -> list[dict]:
    """ZeRO-0 param groups. Their per-parameter states are not attributed to names on purpose: the
    files do not record which optimizer slot belongs to which parameter, and same-shaped parameters
    (layer norm weights and biases) would make any guess silently wrong."""
    return list(_zero0_inner(opt).get("param_groups") or [])
