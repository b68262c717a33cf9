"""Read Megatron-core ``dist_checkpointing`` (torch_dist) checkpoints parameter by parameter.

:class:`MegatronCheckpoint` names every parameter as Megatron itself holds it at tp=1, pp=1
(``decoder.layers.<i>.<rest of the checkpoint key>``) and reads one layer of a stacked tensor by
reading only that layer's chunks. The layout comes from the checkpoint's own metadata (``_layout``);
no spec is needed.

Example::

    ckpt = MegatronCheckpoint("checkpoints/iter_0000100")
    qkv = ckpt.read("decoder.layers.3.self_attention.linear_qkv.weight", "exp_avg")
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import torch

from ucp.core import ConvertError
from .._base import ParamInfo, Region
from ..dcp import DcpFiles, TensorEntry
from ._common import load_common
from ._layout import MegatronLayout, Source, plan_layout

__all__ = ["MegatronCheckpoint", "default_groups"]

_LEGACY_COMMON = "common.pt"  # before the common state moved into the DCP files


class MegatronCheckpoint:
    """A Megatron-core torch_dist checkpoint directory, opened for conversion.

    States of a parameter: ``param`` (the model tensor as saved), ``fp32`` (the distributed
    optimizer's master copy; the model tensor itself when that is float32 and no master was saved)
    and the optimizer's moments (``exp_avg``, ``exp_avg_sq``). The step (Megatron-LM's
    ``iteration``, else the optimizer's) and the param groups come from the saved common state. Megatron does not save which parameter is in which group; the
    groups are assigned by Megatron's default rule (:func:`default_groups`) when the saved groups
    are the default ones, and left unassigned otherwise.

    Args:
        url: the checkpoint directory (local path or fsspec URL).
        storage_options: fsspec options.

    Attributes:
        engine: ``"megatron"``. step: the optimizer step, or None. topology: None (the metadata
        records global shapes, which is all a conversion needs).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError, UnsafeInputError: as the DCP reader.
        ConvertError: an optimizer format this reader does not handle.
    """

    engine = "megatron"

    def __init__(self, url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = os.fspath(url)
        self._files = DcpFiles(self.url, storage_options=storage_options)
        self.layout: MegatronLayout = plan_layout(self._files.metadata, where=self.url)
        self.topology = None
        common = self._common()
        self._groups = _param_groups(common)
        self.step: int | None = _step(common, self._groups)
        self._params = {name: self._info(src) for name, src in self.layout.params.items()}
        group_of = default_groups(self._params, self._groups)
        for name, g in group_of.items():
            self._params[name] = dataclasses.replace(self._params[name], group=g)

    # -- SourceCheckpoint --------------------------------------------------------------------
    def names(self) -> list[str]:
        """Parameter names (Megatron's tp=1 names) in the checkpoint's key order, a stacked key's
        layers one after another."""
        return list(self._params)

    def info(self, name: str) -> ParamInfo:
        """Shape, dtype, states, frozen flag and param group of parameter ``name``.

        Raises:
            KeyError: no such parameter.
        """
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"{self.url}: no parameter {name!r} in this Megatron checkpoint") from None

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        """One state of one parameter (or ``region`` of it); a layer of a stacked tensor is read
        from that layer's chunks only.

        Raises:
            KeyError: no such parameter. ConvertError: the parameter has no such state.
        """
        info = self.info(name)
        if state not in info.states:
            raise ConvertError(f"{self.url}: parameter {name!r} has no state {state!r}; it has "
                               f"{', '.join(info.states)}")
        src = self.layout.params[name]
        entry = self._entry(src, state)
        box = region or tuple((0, n) for n in info.shape)
        if src.layer is None:
            return self._files.tensor(entry, box)
        return self._files.tensor(entry, ((src.layer, src.layer + 1), *box))[0]

    def buffers(self) -> dict[str, torch.Tensor]:
        """None: Megatron's sharded state dict holds parameters only (``_extra_state`` is not read)."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        """The saved param groups' hyper-parameters (``step`` included, as Megatron keeps it)."""
        return [dict(g) for g in self._groups]

    def __repr__(self) -> str:
        return f"MegatronCheckpoint({self.url!r}, {len(self._params)} parameters, step={self.step})"

    # -- helpers -----------------------------------------------------------------------------
    def _common(self) -> list[Any]:
        """The common state values: in the DCP files (``common_state``), or a legacy ``common.pt``."""
        files = self._files
        if self.layout.common:
            return [load_common(data, where=f"{self.url} {e.key!r}")
                    for e, data in zip(self.layout.common, files.raw(self.layout.common))]
        if files.storage.exists(_LEGACY_COMMON):
            return [load_common(files.storage.read(_LEGACY_COMMON), where=f"{self.url}/{_LEGACY_COMMON}")]
        return []

    def _entry(self, src: Source, state: str) -> TensorEntry:
        if state == "param" or (state == "fp32" and "fp32" not in self.layout.states.get(src.key, {})):
            return self.layout.model[src.key]
        return self.layout.states[src.key][state]

    def _info(self, src: Source) -> ParamInfo:
        entry = self.layout.model[src.key]
        states = self.layout.states.get(src.key, {})
        base = ("param", "fp32") if "fp32" in states or entry.dtype == torch.float32 else ("param",)
        return ParamInfo(shape=entry.shape if src.layer is None else entry.shape[1:], dtype=entry.dtype,
                         states=base + tuple(sorted(set(states) - {"fp32"})),
                         frozen=bool(self.layout.states) and not states)


def _step(common: list[Any], groups: list[dict[str, Any]]) -> int | None:
    """Megatron-LM's ``iteration`` (what a resumed run continues from), else the optimizer's step."""
    for value in common:
        it = value.get("iteration") if isinstance(value, dict) else None
        if isinstance(it, int) and not isinstance(it, bool):
            return it
    steps = [g["step"] for g in groups if isinstance(g.get("step"), (int, float))]
    return int(max(steps)) if steps else None


def _param_groups(values: list[Any]) -> list[dict[str, Any]]:
    """Every ``param_groups`` list in the common state, in order (a chained optimizer has several)."""
    found: list[dict[str, Any]] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            groups = v.get("param_groups")
            if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
                found.extend({str(k): x for k, x in g.items() if k != "params"} for g in groups)
                return
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(values)
    return found


def default_groups(params: Mapping[str, ParamInfo], groups: list[dict[str, Any]]) -> dict[str, int]:
    """The param group of each trained parameter under Megatron's default grouping, or {}.

    Megatron-core (``get_megatron_optimizer`` without overrides) turns weight decay off
    (``wd_mult`` 0) for biases and one-dimensional parameters and keeps it (``wd_mult`` 1) for the
    rest; it saves the groups' hyper-parameters but not their members. Any other set of groups
    (learning-rate overrides, expert groups) cannot be told from the checkpoint: {}.
    """
    trained = [n for n, i in params.items() if not i.frozen]
    if len(groups) == 1:
        return dict.fromkeys(trained, 0)
    mults = [(g.get("wd_mult"), bool(g.get("is_expert_parallel"))) for g in groups]
    if len(groups) != 2 or sorted(mults) != [(0.0, False), (1.0, False)]:
        return {}
    no_wd = mults.index((0.0, False))
    return {n: no_wd if n.endswith(".bias") or len(params[n].shape) == 1 else 1 - no_wd for n in trained}

