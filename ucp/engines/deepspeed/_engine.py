"""The ``deepspeed`` engine: DeepSpeed ZeRO 0-3 checkpoints as a conversion source.

Data-parallel (ZeRO) shards are consolidated by the reader (``_reader``). With tensor or
pipeline parallelism each model-parallel rank's tensors are consolidated over dp first, then
across tp/pp through a UCL spec, exactly as for ucp's own plain-tensor saves.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from ucp.core._errors import ConvertError
from ucp.core._topology import Topology

from .._base import ParamInfo, Region, cut
from .._near import deepspeed_near_miss
from .._open import layout_spec
from ._mp import MpLayout
from ._reader import DeepSpeedCheckpoint

__all__ = ["ENGINE", "DeepSpeedEngine", "DeepSpeedSource"]


class DeepSpeedEngine:
    """Detects (``latest`` + ``*model_states.pt``) and opens DeepSpeed checkpoints (local disk)."""

    name = "deepspeed"

    def detect(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        if "://" in url and not url.startswith("file://") or not os.path.isdir(url):
            return None
        try:
            ckpt = DeepSpeedCheckpoint(url)
        except Exception as e:  # noqa: BLE001 - not (readable as) DeepSpeed: another engine may know it
            if _looks_like_deepspeed(url):  # say why, rather than "no engine recognises it"
                raise ConvertError(f"{url} looks like a DeepSpeed checkpoint, but the DeepSpeed "
                                   f"reader refused it: {e}") from e
            return None
        with ckpt:
            return (f"DeepSpeed {ckpt.ds_version} checkpoint '{ckpt.tag}': ZeRO-{ckpt.zero_stage}, "
                    f"dp={ckpt.dp_size}, tp={ckpt.tp_size}, pp={ckpt.pp_size}, {ckpt.dtype}, "
                    f"step {ckpt.step}")

    def near_miss(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        return deepspeed_near_miss(url, storage_options=storage_options)

    def open(self, url: str, *, spec: Any = None, storage_options: Mapping[str, Any] | None = None,
             tag: str | None = None) -> DeepSpeedSource:
        if "://" in url and not url.startswith("file://"):
            raise ConvertError(f"{url}: the DeepSpeed reader reads local directories only; copy the "
                               "checkpoint to local disk first (e.g. with `aws s3 sync`)")
        # a spec of constants only (head counts for a target) lays nothing out: the recorded layout reads
        return DeepSpeedSource(DeepSpeedCheckpoint(url.removeprefix("file://"), tag=tag), layout_spec(spec))


def _looks_like_deepspeed(url: str) -> bool:
    """``*model_states.pt`` files here or one level down (in a tag directory)."""
    root = url.removeprefix("file://")
    try:
        entries = os.listdir(root)
        return any(n.endswith("model_states.pt") for n in entries) or any(
            n.endswith("model_states.pt") for d in entries if os.path.isdir(os.path.join(root, d))
            for n in os.listdir(os.path.join(root, d)))
    except OSError:
        return False


class DeepSpeedSource:
    """A DeepSpeed checkpoint as a ``SourceCheckpoint`` with canonical, consolidated parameters."""

    engine = "deepspeed"

    def __init__(self, ckpt: DeepSpeedCheckpoint, spec: Any) -> None:
        self.ckpt, self.spec = ckpt, spec
        self.step: int | None = ckpt.step
        self.topology: Topology | None = ckpt.topology
        self._mp = Topology(tp=ckpt.tp_size, pp=ckpt.pp_size)  # ranks = mp ranks (dp consolidated)
        self._local: dict[str, dict[int, str]] = {}  # canonical name -> {mp rank: local name}
        self._derived: MpLayout | None = None  # the layout DeepSpeed recorded (no spec given)
        if self._mp.world_size == 1:
            self._local = {n: {0: n} for n in ckpt.names()}
        elif spec is None:
            self._derived = MpLayout.derive(ckpt.tp_size, ckpt.pp_size, lambda mp: ckpt.names(mp_rank=mp),
                                            ckpt.universal_checkpoint_info(), ckpt.tag_dir)
            self._local = {n: {mp: n for mp in self._derived.mp_ranks(n)} for n in self._derived.local}
        else:
            for mp in range(self._mp.world_size):
                for local in ckpt.names(mp_rank=mp):
                    canonical = spec.canonical_name(local, self._mp, mp)
                    self._local.setdefault(canonical, {})[mp] = local

    def names(self) -> list[str]:
        return list(self._local)

    def aliases(self) -> dict[str, str]:
        """Tied weights: other names the model uses for a parameter (alias -> name)."""
        return dict(self.ckpt.shared_params(mp_rank=0)) if self._mp.world_size == 1 else {}

    def info(self, name: str) -> ParamInfo:
        held = self._held(name)
        mp, local = next(iter(held.items()))
        i = self.ckpt.info(local, mp_rank=mp)
        if self._derived is not None:
            return ParamInfo(shape=self._derived.shape(name, i.shape), dtype=i.dtype, states=tuple(i.states),
                             frozen=i.frozen, group=i.group)
        shape = i.shape if self.spec is None else self.spec.infer_shape(
            name, {r: self.ckpt.info(n, mp_rank=r).shape for r, n in held.items()}, self._mp)
        return ParamInfo(shape=tuple(shape), dtype=i.dtype, states=tuple(i.states), frozen=i.frozen,
                         group=i.group)

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        held = self._held(name)
        if self._mp.world_size == 1:
            return cut(self.ckpt.read(held[0], state, mp_rank=0), region)
        if self._derived is not None:
            pieces = {r: self.ckpt.read(n, state, mp_rank=r) for r, n in held.items()}
            return cut(self._derived.join(name, pieces, state, f"{self.ckpt.tag_dir}: {name!r}"), region)
        layout = self.spec.layout(name, self.info(name).shape, self._mp)
        pieces = {r: self.ckpt.read(held[r], state, mp_rank=r) for r in layout.needed()}
        return cut(self.spec.consolidate(name, pieces, self._mp, global_shape=layout.global_shape), region)

    def buffers(self) -> dict[str, torch.Tensor]:
        return self.ckpt.buffers(mp_rank=0)

    def param_groups(self) -> list[dict[str, Any]]:
        return self.ckpt.param_groups()

    def extras(self) -> dict[str, Any]:
        """DeepSpeed's LR scheduler state, under ``deepspeed.lr_scheduler`` (when JSON holds it), and a
        ``PipelineModule``'s layer files and stages under ``deepspeed.pipeline``: the native
        DeepSpeed reshard target writes them back."""
        from ._pipe import pipeline_record

        out = {k: v for k, v in (("lr_scheduler", self.ckpt.lr_scheduler()),
                                 ("pipeline", pipeline_record(self.ckpt))) if v is not None}
        return {"deepspeed": out} if out else {}

    def _held(self, name: str) -> dict[int, str]:
        try:
            return self._local[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r} in {self.ckpt.tag_dir}") from None


ENGINE = DeepSpeedEngine()
