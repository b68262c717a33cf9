"""Live training objects <-> savable state, and restoring them from another topology.

The model's and optimizer's state dicts come from ``torch.distributed.checkpoint.state_dict``
(parameter names as keys; DTensors for tensor parallel and FSDP2), so the same names appear on
every topology. ``ZeroRedundancyOptimizer`` keeps each rank's partition only; it is saved as
that partition's states, keyed by parameter name.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Protocol

import torch

from . import _dtensor
from ._errors import CheckpointNotFoundError, ConvertError

__all__ = ["capture", "restore_same", "restore_resharded", "RegionReader"]



class RegionReader(Protocol):
    """Reads regions of a consolidated checkpoint's tensors."""

    def read(self, name: str, state: str, region: tuple[slice, ...] | None) -> torch.Tensor:
        """The region (None: all) of state ``state`` of parameter ``name``."""

    def states(self, name: str) -> tuple[str, ...]:
        """The states saved for parameter ``name`` (``param`` included)."""


def _is_zero(opt: Any) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(opt, ZeroRedundancyOptimizer)


def _roles(state: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The keys of the model (an nn.Module) and of its optimizer in the user's state."""
    model = next((k for k, v in state.items() if isinstance(v, torch.nn.Module)), None)
    optim = next((k for k, v in state.items() if isinstance(v, torch.optim.Optimizer)), None)
    if optim is not None and model is None:
        raise ConvertError("the state holds an optimizer but no nn.Module: the optimizer's states are "
                           "saved by parameter name, which needs the model")
    return model, optim


def _names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _zero_state(model: torch.nn.Module, opt: Any) -> dict[str, Any]:
    """This rank's partition of a ZeroRedundancyOptimizer, keyed by parameter name."""
    names, local = _names(model), opt.optim
    state = {names[id(p)]: dict(s) for p, s in local.state.items()}
    # the wrapper's groups: the LR scheduler drives them, and `step` copies them down later
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return {"state": state, "param_groups": groups}


def capture(state: Mapping[str, Any]) -> dict[str, Any]:
    """The savable form of ``state``: model/optimizer state dicts by name, ``state_dict()`` of
    other stateful objects, plain values as they are, and this rank's RNG states."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_key, optim_key = _roles(state)
    out: dict[str, Any] = {"extra": {}, "rng": rng_state()}
    if model_key is not None:
        model = state[model_key]
        out["model"] = get_model_state_dict(model)
        if optim_key is not None:
            opt = state[optim_key]
            out["optim"] = _zero_state(model, opt) if _is_zero(opt) else get_optimizer_state_dict(model, opt)
    for k, v in state.items():
        if k in (model_key, optim_key):
            continue
        out["extra"][k] = v.state_dict() if hasattr(v, "state_dict") and hasattr(v, "load_state_dict") else v
    out["roles"] = {"model": model_key, "optim": optim_key}
    return out


def restore_extra(state: dict[str, Any], saved: Mapping[str, Any]) -> None:
    """Stateful objects load their saved ``state_dict``; plain values are replaced in ``state``."""
    for k, v in saved.items():
        if k not in state:
            continue
        if hasattr(state[k], "load_state_dict"):
            state[k].load_state_dict(v)
        else:
            state[k] = v


def restore_same(state: dict[str, Any], saved: Mapping[str, Any]) -> None:
    """Restores ``state`` from this very rank's saved form (same topology)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    model_key, optim_key = _roles(state)
    if model_key is not None:
        set_model_state_dict(state[model_key], saved["model"])
        if optim_key is not None:
            opt = state[optim_key]
            if _is_zero(opt):
                _load_zero(state[model_key], opt, saved["optim"])
            else:
                set_optimizer_state_dict(state[model_key], opt, saved["optim"])
    restore_extra(state, saved.get("extra", {}))
    set_rng_state(saved["rng"])


def _load_zero(model: torch.nn.Module, opt: Any, saved: Mapping[str, Any]) -> None:
    params = dict(model.named_parameters())
    for name, states in saved["state"].items():
        opt.optim.state[params[name]] = dict(states)
    _set_zero_groups(opt, saved["param_groups"])


def _set_zero_groups(opt: Any, saved: list[Mapping[str, Any]]) -> None:
    """Hyper-parameters into both the wrapper's groups (which the LR scheduler drives and
    ``step`` copies down) and the local optimizer's."""
    for groups in (opt.param_groups, opt.optim.param_groups):
        for group, sg in zip(groups, saved):
            group.update({k: v for k, v in sg.items() if k != "params"})


def _like(template: Any, reader: RegionReader, name: str, state: str) -> Any:
    """``template``'s local part of tensor ``name``/``state``, read from the consolidated source."""
    if _dtensor.is_dtensor(template):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(template.shape, template.device_mesh,
                                                              template.placements)
        region = tuple(slice(o, o + s) for o, s in zip(offset, shape))
        local = reader.read(name, state, region).to(template.dtype)
        return _dtensor.to_dtensor(local, template.device_mesh, tuple(template.placements),
                                   tuple(template.shape))
    return reader.read(name, state, None).to(template.dtype) if isinstance(template, torch.Tensor) else template


def restore_resharded(state: dict[str, Any], reader: RegionReader, shapes: Mapping[str, tuple[int, ...]],
                      groups: list[dict[str, Any]], saved_extra: Mapping[str, Any]) -> None:
    """Restores ``state`` on a new topology, reading from the consolidated checkpoint only the
    regions this rank holds (``shapes``: canonical shapes, to check the model still fits)."""
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    model_key, optim_key = _roles(state)
    if model_key is not None:
        model = state[model_key]
        template = get_model_state_dict(model)
        for name, t in template.items():
            if name not in shapes:
                raise CheckpointNotFoundError(f"the checkpoint has no tensor {name!r} of the live model")
            if tuple(t.shape) != tuple(shapes[name]):
                raise ConvertError(f"{name}: the checkpoint's shape {list(shapes[name])} differs from the "
                                   f"live model's {list(t.shape)}; was the model changed?")
        set_model_state_dict(model, {n: _like(t, reader, n, "param") for n, t in template.items()})
        if optim_key is not None:
            _restore_optim(model, state[optim_key], reader, groups, get_optimizer_state_dict,
                           set_optimizer_state_dict)
    restore_extra(state, saved_extra)


def _restore_optim(model: Any, opt: Any, reader: RegionReader, groups: list[dict[str, Any]],
                   get_osd: Any, set_osd: Any) -> None:
    if _is_zero(opt):
        names = _names(model)
        for group in opt.optim.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                opt.optim.state[p] = {s: reader.read(name, s, None) for s in reader.states(name)
                                      if s not in ("param", "fp32")}
        _set_zero_groups(opt, groups)
        return
    template = get_osd(model, opt)  # initialises empty optimizer states
    osd = {"state": {n: {s: _like(t, reader, n, s) for s, t in st.items()}
                     for n, st in template["state"].items()},
           "param_groups": [{**{k: v for k, v in saved.items() if k != "params"}, "params": g["params"]}
                            for g, saved in zip(template["param_groups"], groups)]}
    set_osd(model, opt, osd)


def rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        out["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return out


def set_rng_state(saved: Mapping[str, Any]) -> None:
    torch.set_rng_state(saved["torch"])
    random.setstate(_tuples(saved["python"]))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    if "numpy" in saved:
        import numpy as np

        n = saved["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))


def reseed(seed: int, step: int, rank: int) -> None:
    """RNG policy when the world size changed: every generator re-derived from (seed, step, rank)."""
    derived = (seed * 1_000_003 + step * 10_007 + rank) % (2**63)
    torch.manual_seed(derived)
    random.seed(derived)
    try:
        import numpy as np

        np.random.seed(derived % (2**32))
    except ImportError:  # pragma: no cover
        pass


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
