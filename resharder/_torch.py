"""The torch target: load a checkpoint into live modules (plain, DTensor TP, FSDP2).

The live model's own state dicts (``get_model_state_dict`` / ``get_optimizer_state_dict``) are
the template: every DTensor says, through its mesh and placements, which box of the global
tensor this rank holds, so each rank reads only that box. The filled state dicts go back through
``set_model_state_dict`` / ``set_optimizer_state_dict``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ucp.resharder import _dtensor
from ucp.core._errors import StateError
from ucp.core._topology import Topology

from ._plan import SCALAR_STATES, Copy, LocalTensor, RankPlan, Read
from ._read import ReadStats, read_plan
from ._source import ArraySource, open_array_source, read_many

__all__ = ["load_into"]


def _box(value: Any) -> tuple[tuple[tuple[int, int], ...], Any]:
    """The global box a tensor holds, and how to rebuild it: ``(mesh, placements)`` or None."""
    if not _dtensor.is_dtensor(value):
        return tuple((0, s) for s in value.shape), None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh,
                                                          value.placements)
    box_like = all(type(p) in (Shard, Replicate) for p in value.placements)
    if not box_like or tuple(shape) != tuple(value.to_local().shape):
        return tuple((0, s) for s in value.shape), (value.device_mesh, value.placements, "split")
    return tuple((o, o + s) for o, s in zip(offset, shape)), (value.device_mesh, value.placements)


class _Planner:
    """Builds the plan for one template state dict, remembering how to rebuild each value."""

    def __init__(self, source: ArraySource) -> None:
        self.source = source
        self.names, self.buffers = set(source.names()), set(source.buffer_names())
        self.tensors: list[LocalTensor] = []
        self.reads: list[Read] = []
        self.rebuild: dict[tuple[Any, ...], tuple[Any, Any]] = {}
        self.out: dict[tuple[Any, ...], torch.Tensor] = {}

    def add(self, path: tuple[Any, ...], name: str, state: str | None, value: torch.Tensor) -> None:
        if state is not None and (state in SCALAR_STATES or value.dim() == 0):
            self.tensors.append(LocalTensor(path, None, None))
            self.reads.append(Read(name, state, path, (), whole=True))
            self.rebuild[path] = (value, None)
            return
        where = f"{name!r} ({state or 'buffer'})"
        if state is not None and tuple(value.shape) != tuple(self.source.info(name).shape):
            raise StateError(f"{where}: the live model has shape {list(value.shape)}, the "
                             f"checkpoint {list(self.source.info(name).shape)}; is it the same model?")
        box, how = _box(value)
        shape = tuple(b - a for a, b in box)
        self.tensors.append(LocalTensor(path, shape, value.dtype))
        full = tuple((0, s) for s in shape)
        self.reads.append(Read(name, state, path, (Copy(box, 0, shape, full),), tuple(range(len(box)))))
        self.rebuild[path] = (value, how)
        local = value.to_local() if how is not None and len(how) == 2 else value if how is None else None
        if local is not None and local.device.type == "cpu" and local.is_contiguous() \
                and tuple(local.shape) == shape:
            self.out[path] = local.detach()  # the live tensor: filled in place, no copy after

    def check_dtypes(self) -> None:
        """Every live tensor has the stored dtype (array metadata read in parallel, no data)."""
        reads = [r for r in self.reads if not r.whole]
        infos = read_many(self.source, [(r.name, r.state) for r in reads])
        for r, info in zip(reads, infos):
            live = self.rebuild[r.path][0].dtype
            if info.dtype is not None and info.dtype != live:
                raise StateError(f"{r.name!r} ({r.state or 'buffer'}): the live tensor is {live}, "
                                 f"the checkpoint holds {info.dtype}; build the model in "
                                 f"{info.dtype} (or load it in that dtype and convert afterwards)")

    def model(self, msd: Mapping[str, Any], strict: bool) -> list[str]:
        missing = []
        for key, value in msd.items():
            if key in self.names:
                info = self.source.info(key)
                use_fp32 = value.dtype == torch.float32 and "fp32" in info.states
                self.add(("model", key), key, "fp32" if use_fp32 else "param", value)
            elif key in self.buffers:
                self.add(("model", key), key, None, value)
            else:
                missing.append(key)
        if missing and strict:
            raise StateError(f"the checkpoint has no {missing[:5]} ({len(missing)} model entries "
                             "missing); pass strict=False to keep their current values")
        return missing

    def optim(self, osd: Mapping[str, Any]) -> None:
        for fqn, states in osd.get("state", {}).items():
            if fqn not in self.names:
                raise StateError(f"the checkpoint has no parameter {fqn!r} (optimizer state)")
            have = self.source.info(fqn).states
            for s, value in states.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if s not in have:
                    raise StateError(f"the checkpoint has no optimizer state {s!r} for {fqn!r} "
                                     f"(it has {list(have)}); is it the same optimizer?")
                self.add(("optim", fqn, s), fqn, s, value)

    def zero_optim(self, model: torch.nn.Module, opt: Any) -> dict[torch.nn.Parameter, str]:
        """A ``ZeroRedundancyOptimizer``: every state of the parameters this rank's partition
        holds, whole (their shapes and dtypes are the checkpoint's). Returns them by parameter."""
        names = {id(p): n for n, p in model.named_parameters()}
        held = {}
        for group in opt.optim.param_groups:
            for p in group["params"]:
                fqn = held[p] = names[id(p)]
                if fqn not in self.names:
                    raise StateError(f"the checkpoint has no parameter {fqn!r} (optimizer state)")
                for s in self.source.info(fqn).states:
                    if s in ("param", "fp32"):
                        continue
                    path = ("optim", fqn, s)
                    self.tensors.append(LocalTensor(path, None, None, like=(fqn, s)))
                    self.reads.append(Read(fqn, s, path, (), whole=True))
        return held

    def value(self, path: tuple[Any, ...], tensors: Mapping[Any, torch.Tensor]) -> Any:
        template, how = self.rebuild[path]
        if path in self.out:  # read in place into the template's own memory
            return template
        local = tensors[path].to(template.device)
        if how is None:
            return local.reshape(template.shape) if template.dim() == 0 else local
        if len(how) == 3:  # placements whose shard is not one box: split the whole tensor locally
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(local, how[0], how[1], src_data_rank=None)
        return _dtensor.to_dtensor(local, how[0], tuple(how[1]), tuple(template.shape))


def _groups(source: ArraySource, osd: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The live optimizer's groups with the checkpoint's hyper-parameters (types kept)."""
    stored, live = source.param_groups, list(osd.get("param_groups", []))
    if len(stored) != len(live):
        raise StateError(f"the optimizer has {len(live)} param groups, the checkpoint "
                         f"{len(stored)}; build the optimizer with the same groups")
    out = []
    for i, (mine, theirs) in enumerate(zip(live, stored)):
        for fqn in mine["params"]:
            group = source.info(fqn).group
            if group is not None and group != i:
                raise StateError(f"{fqn!r} is in optimizer group {i} here, but in group {group} "
                                 "in the checkpoint; build the optimizer with the same groups")
        hyper = {k: _like(mine.get(k), v) for k, v in theirs.items() if k != "params"}
        out.append({**mine, **hyper, "params": mine["params"]})
    return out


def _is_zero(opt: Any) -> bool:
    return _dtensor.is_zero_redundancy(opt)


def _load_zero(opt: Any, held: Mapping[Any, str], source: ArraySource,
               tensors: Mapping[Any, torch.Tensor]) -> None:
    """This rank's partition into the local optimizer; hyper-parameters into both the wrapper's
    groups (which the LR scheduler drives and ``step`` copies down) and the local ones."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for path, t in tensors.items():
        if path[0] == "optim":
            states.setdefault(path[1], {})[path[2]] = t
    for p, fqn in held.items():
        opt.optim.state[p] = states.get(fqn, {})
    set_zero_groups(opt, source.param_groups)


def set_zero_groups(opt: Any, stored: Sequence[Mapping[str, Any]]) -> None:
    """Saved hyper-parameters into a ``ZeroRedundancyOptimizer``'s groups (which the LR scheduler
    drives and ``step`` copies down) and its local optimizer's.

    Raises:
        StateError: the optimizer has another number of param groups.
    """
    for groups in (opt.param_groups, opt.optim.param_groups):
        if len(groups) != len(stored):
            raise StateError(f"the optimizer has {len(groups)} param groups, the checkpoint "
                             f"{len(stored)}; build the optimizer with the same groups")
        for group, saved in zip(groups, stored):
            group.update({k: _like(group.get(k), v) for k, v in saved.items() if k != "params"})


def _like(template: Any, value: Any) -> Any:
    """``value`` as the live type (JSON made tuples lists)."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(template, torch.Tensor) and not isinstance(value, torch.Tensor):
        return torch.tensor(value, dtype=template.dtype)
    return value


def load_into(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, src: Any, *,
              spec: Any = None, engine: str = "auto", tag: str | None = None, strict: bool = True,
              storage_options: Mapping[str, Any] | None = None, workers: int = 8) -> ReadStats:
    """Loads a checkpoint into a live model (and optimizer), on any mesh and placements.

    Called by every rank of the job (``set_*_state_dict`` may communicate); each rank reads only
    the boxes its DTensors hold (plain tensors: all of them; a ``ZeroRedundancyOptimizer``: the
    states of the parameters its partition holds). The model and optimizer must have been built
    and sharded (``parallelize_module``, ``fully_shard``) as for training.

    Args:
        model: the model; its state dict keys are the checkpoint's canonical names.
        optimizer: its optimizer, or None to load weights only.
        src: a universal checkpoint (URL or opened) or any checkpoint ``ucp convert`` reads.
        spec / engine / tag / storage_options: how to open ``src`` (as for ``ucp.convert``).
        strict: every model entry must be in the checkpoint.
        workers: reads in flight.

    Returns:
        This rank's :class:`ReadStats` (bytes read, needed, amplification).

    Raises:
        StateError: the model or optimizer does not match the checkpoint (names the entry).

    Example:
        >>> fully_shard(model); opt = torch.optim.AdamW(model.parameters())
        >>> stats = load_into(model, opt, "universal/")
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
        set_optimizer_state_dict)

    source = open_array_source(src, engine=engine, spec=spec, tag=tag, storage_options=storage_options)
    zero = optimizer is not None and _is_zero(optimizer)
    msd = get_model_state_dict(model)
    osd = get_optimizer_state_dict(model, optimizer) if optimizer is not None and not zero else None
    p = _Planner(source)
    p.model(msd, strict)
    held = p.zero_optim(model, optimizer) if zero else {}
    if osd is not None:
        p.optim(osd)
    p.check_dtypes()
    plan = RankPlan(Topology(), 0, 1, tuple(p.tensors), tuple(p.reads), (), ())
    loaded = read_plan(plan, source, workers=workers, out=p.out)
    if not all(("model", k) in p.out for k in msd if ("model", k) in p.rebuild):
        # some entries could not be read into the model's own memory: load them through torch
        new_msd = {k: p.value(("model", k), loaded.tensors) for k in msd if ("model", k) in p.rebuild}
        set_model_state_dict(model, new_msd, options=StateDictOptions(strict=strict))
    if zero:
        _load_zero(optimizer, held, source, loaded.tensors)
    if osd is not None and not _fill_in_place(optimizer, osd, p, loaded.tensors, _groups(source, osd)):
        state = {fqn: {s: p.value(("optim", fqn, s), loaded.tensors) if ("optim", fqn, s) in p.rebuild
                       else v for s, v in states.items()}
                 for fqn, states in osd["state"].items()}
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": _groups(source, osd)})
    return loaded.stats


def _fill_in_place(optimizer: Any, osd: Mapping[str, Any], p: _Planner, tensors: Mapping[Any, torch.Tensor],
                   groups: list[dict[str, Any]]) -> bool:
    """When every optimizer state tensor was read straight into the optimizer's own memory (the
    state dict's tensors are the live ones), the scalar states are copied into theirs and the
    hyper-parameters set, and ``set_optimizer_state_dict`` (which copies every state once more)
    is not needed. Returns False, changing nothing, when some state needs rebuilding."""
    scalars = []
    for fqn, states in osd["state"].items():
        for s, v in states.items():
            path = ("optim", fqn, s)
            if path in p.out or path not in p.rebuild:
                continue
            if not isinstance(v, torch.Tensor) or v.dim() != 0 or _dtensor.is_dtensor(v):
                return False
            scalars.append((v, path))
    if len(groups) != len(optimizer.param_groups):
        return False
    with torch.no_grad():
        for v, path in scalars:
            v.copy_(p.value(path, tensors))
    for live, group in zip(optimizer.param_groups, groups):
        live.update({k: v for k, v in group.items() if k != "params"})
    return True
