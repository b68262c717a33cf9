"""Live training objects <-> savable state, and restoring them from another topology.

The model's and optimizer's state dicts come from ``torch.distributed.checkpoint.state_dict``
(parameter names as keys; DTensors for tensor parallel and FSDP2), so the same names appear on
every topology. ``ZeroRedundancyOptimizer`` keeps each rank's partition only; it is saved as
that partition's states, keyed by parameter name.
"""

from __future__ import annotations

import random
from typing import Any, Mapping

import torch

from ucp.resharder import _dtensor
from ucp.resharder._torch import set_zero_groups
from ucp.core._errors import ConvertError

__all__ = ["capture", "restore_same", "restore_extra", "roles", "reseed"]



def _is_zero(opt: Any) -> bool:
    return _dtensor.is_zero_redundancy(opt)


def roles(state: Mapping[str, Any]) -> tuple[str | None, str | None]:
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

    model_key, optim_key = roles(state)
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

    model_key, optim_key = roles(state)
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
    set_zero_groups(opt, saved["param_groups"])


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
