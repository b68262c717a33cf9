"""Loading a universal checkpoint with torch's own ``torch.distributed.checkpoint.load``.

:class:`UniversalReader` is a DCP ``StorageReader`` over a universal checkpoint, so any trainer
that loads with DCP (FSDP2, DTensor TP, torchtitan-style loops) resumes from it at any world size
and sharding, each rank reading only the chunks of the regions it holds::

    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    import torch.distributed.checkpoint as dcp
    import ucp.dcp

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=ucp.dcp.UniversalReader("s3://bucket/universal"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

The checkpoint is offered under the keys such a state dict flattens to: ``model.<fqn>`` for every
parameter (in the model's dtype) and buffer; ``optim.state.<fqn>.<state>`` for every optimizer
state (``exp_avg``, ``exp_avg_sq``, ``step``, ...); ``optim.param_groups.<i>.<hyper-parameter>``
(``model_key`` / ``optim_key`` rename the two sections). Keys the loading state dict holds that
the checkpoint does not (an LR scheduler's ``initial_lr``, other top-level entries) make DCP's
default planner refuse the load; pass ``planner=DefaultLoadPlanner(allow_partial_load=True)`` to
keep their current values.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping

import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader

from ucp.core._errors import ConvertError
from ucp.core._stfile import dtype_from_name

__all__ = ["UniversalReader"]


class UniversalReader(StorageReader):
    """A ``torch.distributed.checkpoint`` storage reader over a universal checkpoint.

    Args:
        url: the universal checkpoint (``ucp convert``'s output), local or any fsspec URL.
        storage_options: passed to fsspec.
        model_key, optim_key: the top-level keys of the model and optimizer state dicts.
    """

    def __init__(self, url: str | os.PathLike | None = None, *,
                 storage_options: Mapping[str, Any] | None = None, model_key: str = "model",
                 optim_key: str = "optim") -> None:
        super().__init__()
        self.url = None if url is None else str(url)
        self.storage_options = storage_options
        self.model_key, self.optim_key = model_key, optim_key
        self._ckpt: Any = None
        self._keys: dict[str, tuple[str, str | None]] = {}  # flattened key -> (name, state)
        self._values: dict[str, Any] = {}  # flattened key -> a hyper-parameter's value

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.url = str(checkpoint_id)
        self._ckpt = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        from ucp.universal import is_universal

        try:
            return is_universal(str(checkpoint_id))
        except Exception:  # noqa: BLE001 - DCP asks every reader; a foreign path is just "no"
            return False

    def _open(self) -> Any:
        if self._ckpt is None:
            if self.url is None:
                raise ConvertError("UniversalReader: no checkpoint given; pass its URL (or "
                                   "checkpoint_id= to torch.distributed.checkpoint.load)")
            from ucp.universal import open_universal

            self._ckpt = open_universal(self.url, storage_options=self.storage_options)
        return self._ckpt

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's tensors and hyper-parameters under the keys a ``get_state_dict``
        state dict flattens to; each tensor is one chunk (reads fetch only what a region needs)."""
        ckpt = self._open()
        entries: dict[str, Any] = {}
        for name in ckpt.names():
            info = ckpt.info(name)
            self._tensor(entries, f"{self.model_key}.{name}", (name, "param"), info.shape, info.dtype)
            for state in info.states:
                if state in ("param", "fp32"):
                    continue
                shape = () if state == "step" else info.shape
                self._tensor(entries, f"{self.optim_key}.state.{name}.{state}", (name, state), shape,
                             torch.float32)
        buffers = ckpt.metadata.get("buffers") or {}
        for name in ckpt.buffer_names():
            self._tensor(entries, f"{self.model_key}.{name}", (name, None), tuple(buffers[name]["shape"]),
                         dtype_from_name(buffers[name]["dtype"]))
        for i, group in enumerate(ckpt.param_groups):
            members = [n for n in ckpt.names() if ckpt.info(n).group == i]
            for hp, value in {**group, "params": members}.items():
                key = f"{self.optim_key}.param_groups.{i}.{hp}"
                entries[key] = BytesStorageMetadata()
                self._values[key] = value
        return Metadata(state_dict_metadata=entries)

    def _tensor(self, entries: dict[str, Any], key: str, where: tuple[str, str | None],
                shape: Any, dtype: torch.dtype) -> None:
        size = torch.Size(shape)
        entries[key] = TensorStorageMetadata(
            properties=TensorProperties(dtype=dtype), size=size,
            chunks=[ChunkStorageMetadata(offsets=torch.Size([0] * len(size)), sizes=size)])
        self._keys[key] = where

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        if not self._keys:  # a reader built on another rank: the same checkpoint, read here
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Reads each item's region (only the chunks that hold it) into the planner's tensor."""
        for item in plan.items:
            key = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(self._value(key, planner), buf)  # DCP hands values over as torch.save bytes
                buf.seek(0)
                planner.load_bytes(item, buf)
                continue
            data = self._read(key, item)
            target = planner.resolve_tensor(item).detach()
            target.copy_(data)
            planner.commit_tensor(item, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read(self, key: str, item: ReadItem) -> torch.Tensor:
        name, state = self._keys[key]
        region = [slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths)]
        ckpt = self._open()
        if state is None:
            return ckpt.read_buffer(name)[tuple(region)]
        return ckpt.read(name, state, region or None)

    def _value(self, key: str, planner: LoadPlanner) -> Any:
        """A hyper-parameter as the loading state dict holds it (JSON turned tuples into lists;
        a group's ``params`` are the loading optimizer's own FQNs, checked to be the same set)."""
        value = self._values[key]
        live = (getattr(planner, "state_dict", None) or {}).get(key)
        if key.endswith(".params") and isinstance(live, list):
            if sorted(map(str, live)) != sorted(value):
                group = key.rsplit(".", 2)[-2]
                raise ConvertError(f"{self.url}: param group {group} holds {sorted(value)[:4]}..., the "
                                   f"loading optimizer's {sorted(map(str, live))[:4]}...; build the "
                                   "optimizer with the same parameter groups")
            return live
        if isinstance(live, tuple) and isinstance(value, list):
            return tuple(value)
        return value

