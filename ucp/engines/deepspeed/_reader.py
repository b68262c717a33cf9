"""Read DeepSpeed ZeRO checkpoints (stages 0-3; fp32, bf16, fp16) parameter by parameter.

:class:`DeepSpeedCheckpoint` opens a checkpoint's files without running code from them (a narrow
``weights_only`` allow-list, see ``_deepspeed_files``) and without reading tensor bytes up front. Each
:meth:`~DeepSpeedCheckpoint.read` then reads only the element ranges that hold one state of one
parameter, straight into the result, so a converter that walks :meth:`~DeepSpeedCheckpoint.names` in
order reads every byte region once and holds about one parameter's states at a time.

Example::

    with DeepSpeedCheckpoint("runs/ckpt") as ckpt:  # the save_dir; the tag comes from 'latest'
        for name in ckpt.names():
            info = ckpt.info(name)
            tensors = {state: ckpt.read(name, state) for state in info.states}

DeepSpeed's file layout, and how a parameter's bytes are found in it, is described in
``docs/formats/deepspeed.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator

import torch

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError, UcpError
from ucp.core._topology import Topology
from .._base import ParamInfo as _BaseParamInfo
from ._files import RangeReader, TensorRef, load_index
from ._layout import CheckpointFiles, MpPlan, ParamPlan, discover, plan_mp_rank

__all__ = ["DeepSpeedCheckpoint", "ParamInfo"]

#: More data/tensor/pipeline-parallel ranks than this means a damaged file, not a real run.
_MAX_RANKS = 1 << 20


@contextlib.contextmanager
def _structure(where: str) -> Iterator[None]:
    """Reports what malformed metadata raises from deep inside the reader (a value of the wrong
    type or range where the layout expects another) as the CorruptCheckpointError it is."""
    try:
        yield
    except UcpError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"{where}: unexpected structure ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the files "
            "are damaged or from an unsupported DeepSpeed version (this reader follows 0.19.8)") from e


def _ref(ref: Any, name: str) -> TensorRef:
    if not isinstance(ref, TensorRef):
        raise CorruptCheckpointError(f"{name!r}: a {type(ref).__name__} where a tensor should be; the "
                                     "checkpoint's files are damaged")
    return ref


@dataclasses.dataclass(frozen=True)
class ParamInfo(_BaseParamInfo):
    """What a checkpoint holds for one parameter (the engines' common ``ParamInfo``, plus two fields).

    Attributes:
        shape: its global shape (for tp=pp=1; else the shape on that model-parallel rank).
        dtype: the model's dtype for it (``param`` state); ``fp32`` and optimizer states are float32.
        states: the states that can be read, e.g. ``("param", "fp32", "exp_avg", "exp_avg_sq")``.
        frozen: True for a parameter the optimizer does not update (``requires_grad=False``).
        group: the optimizer param group index, None for frozen parameters.
        name: the parameter's name in the model's state dict.
        aliases: other names the model uses for this same tensor (tied weights).
    """

    name: str = ""
    aliases: tuple[str, ...] = ()


class DeepSpeedCheckpoint:
    """One tag of a DeepSpeed checkpoint, opened for reading.

    Args:
        path: DeepSpeed's ``save_dir`` (holding ``latest`` and tag directories) or a tag directory.
        tag: the tag directory to read; default: the one named in ``path/latest``.
        allow_unsafe_pickle: unpickle with the full pickle machinery, which can run code from the
            files (and needs DeepSpeed importable). Only for checkpoints you trust and that hold
            objects outside DeepSpeed's usual few.

    Attributes:
        engine: ``"deepspeed"``. topology: dp/tp/pp sizes and ZeRO stage as a :class:`~ucp.Topology`.
        tag, tag_dir: the tag and its directory.
        zero_stage: 0, 1, 2 or 3. dp_size / tp_size / pp_size: the saving run's parallel sizes.
        step: the optimizer's step count (0 when the optimizer keeps none).
        global_steps: the engine's step counter. dtype: the model dtype. ds_version: DeepSpeed's version.

    Raises:
        CheckpointNotFoundError: no checkpoint at ``path``, or a rank's file is missing.
        CorruptCheckpointError: a file is truncated or corrupt, or files disagree (mixed runs).
        UnsafeInputError: a file's pickle would run code, or the tag would leave ``path``.
        ConvertError: a layout this reader does not handle (MoE experts).
    """

    engine = "deepspeed"

    def __init__(self, path: str | os.PathLike, *, tag: str | None = None,
                 allow_unsafe_pickle: bool = False) -> None:
        self._unsafe = allow_unsafe_pickle
        self._files: CheckpointFiles = discover(path, tag)
        self.tag, self.tag_dir = self._files.tag, self._files.tag_dir
        self._reader = RangeReader()
        self._trees: dict[str, Any] = {}
        self._plans: dict[int, MpPlan] = {}
        first = self._first_model_file()
        meta = self._load(first)
        with _structure(first):
            dims = meta.get("checkpoint_parallel_dimensions") or {}
            self.tp_size = int(dims.get("tp_degree") or meta.get("mp_world_size") or 1)
            self.pp_size = int(dims.get("pp_degree") or 1)
            self.global_steps = int(meta.get("global_steps") or 0)
            self.ds_version = str(meta.get("ds_version") or "unknown")
        if not (1 <= self.tp_size <= _MAX_RANKS and 1 <= self.pp_size <= _MAX_RANKS):
            raise CorruptCheckpointError(f"{first}: tp={self.tp_size}, pp={self.pp_size} is not a parallel "
                                         "layout; the file is damaged")
        self._check_mp_files()
        plan = self._plan_at(0)
        self.zero_stage, self.dp_size = plan.stage, plan.dp_size
        self.dtype = next((p.dtype for p in plan.params.values() if not p.frozen), torch.float32)
        with _structure(self.tag_dir):
            self.step = self._step(plan)

    # -- files ---------------------------------------------------------------------------------
    def _load(self, path: str) -> Any:
        if path in self._trees:  # pipeline plans look at every stage's model and layer files
            return self._trees[path]
        tree = load_index(path, allow_unsafe_pickle=self._unsafe)
        if not isinstance(tree, dict):
            raise CorruptCheckpointError(f"{path}: holds a {type(tree).__name__}, not a DeepSpeed state dict; "
                                         "this file does not belong in a DeepSpeed checkpoint")
        self._trees[path] = tree
        return tree

    def universal_checkpoint_info(self) -> Any:
        """What DeepSpeed records about its tp layout (``universal_checkpoint_info``), or None."""
        return self._load(self._first_model_file()).get("universal_checkpoint_info")

    def _first_model_file(self) -> str:
        if self._files.zero3_model:
            return self._files.zero3_model[min(self._files.zero3_model)]
        return self._files.model[min(self._files.model)]

    def _check_mp_files(self) -> None:
        mp_size = self.tp_size * self.pp_size
        found = {m for _, m in self._files.zero3_model} if self._files.zero3_model else set(self._files.model)
        missing = sorted(set(range(mp_size)) - found)
        if missing:
            raise CheckpointNotFoundError(
                f"{self.tag_dir}: model state files for mp rank(s) {missing} are missing (tp={self.tp_size}, "
                f"pp={self.pp_size} expects {mp_size}); copy them from the run that saved this checkpoint")
        extra = sorted(found - set(range(mp_size)))
        if extra:
            raise CorruptCheckpointError(f"{self.tag_dir}: model state files for mp rank(s) {extra}, but the "
                                         f"checkpoint says tp={self.tp_size}, pp={self.pp_size}; remove stray files")

    def _plan(self, mp_rank: int | None) -> MpPlan:
        return self._plan_at(self._mp(mp_rank))

    def _plan_at(self, mp: int) -> MpPlan:
        if mp not in self._plans:
            with _structure(f"{self.tag_dir}: the files of mp rank {mp}"):
                self._plans[mp] = plan_mp_rank(self._files, mp, self._load)
        return self._plans[mp]

    def _mp(self, mp_rank: int | None) -> int:
        mp_size = self.tp_size * self.pp_size
        if mp_rank is None:
            if mp_size != 1:
                raise ConvertError(
                    f"{self.tag_dir}: saved with tp={self.tp_size}, pp={self.pp_size}; pass mp_rank= to get one "
                    "model-parallel rank's data-parallel-consolidated tensors (mp_rank = pp * tp_size + tp); "
                    "joining tensor/pipeline shards needs a UCL spec")
            return 0
        if not 0 <= mp_rank < mp_size:
            raise ConvertError(f"{self.tag_dir}: mp_rank {mp_rank} out of range 0..{mp_size - 1}")
        return mp_rank

    @property
    def topology(self) -> Topology:
        """The saving run's layout: ``dp``, ``tp``, ``pp`` and the ZeRO stage."""
        return Topology(dp=self.dp_size, tp=self.tp_size, pp=self.pp_size, zero=self.zero_stage)

    @property
    def mp_size(self) -> int:
        """Number of model-parallel ranks (``tp_size * pp_size``); ``mp_rank = pp * tp_size + tp``."""
        return self.tp_size * self.pp_size

    def files(self) -> dict[str, list[str]]:
        """Every recognised file by kind: ``model``, ``zero3_model``, ``optim``, ``layer`` (sorted)."""
        f = self._files
        return {"model": [f.model[k] for k in sorted(f.model)],
                "zero3_model": [f.zero3_model[k] for k in sorted(f.zero3_model)],
                "optim": [f.optim[k] for k in sorted(f.optim)],
                "layer": [f.layers[k] for k in sorted(f.layers)]}

    def layer_files(self) -> dict[tuple[int, str], str]:
        """Pipeline layer files ``layer_XX-<rank>-model_states.pt`` by (layer index, rank suffix)."""
        return dict(self._files.layers)

    # -- parameters ----------------------------------------------------------------------------
    def names(self, *, mp_rank: int | None = None) -> list[str]:
        """Parameter names (trainable and frozen) in model order; a tied alias is not repeated."""
        return list(self._plan(mp_rank).params)

    def shared_params(self, *, mp_rank: int | None = None) -> dict[str, str]:
        """Tied parameters: alias name -> the name under which :meth:`names` lists the tensor."""
        return dict(self._plan(mp_rank).aliases)

    def _param(self, name: str, mp_rank: int | None) -> tuple[MpPlan, ParamPlan]:
        plan = self._plan(mp_rank)
        key = plan.aliases.get(name, name)
        if key not in plan.params:
            raise KeyError(f"{self.tag_dir}: no parameter {name!r} in this DeepSpeed checkpoint "
                           f"(it has {len(plan.params)}; see names())")
        return plan, plan.params[key]

    def info(self, name: str, *, mp_rank: int | None = None) -> ParamInfo:
        """Shape, dtype, readable states, frozen flag and param group of parameter ``name``."""
        plan, p = self._param(name, mp_rank)
        aliases = tuple(a for a, src in plan.aliases.items() if src == p.name)
        return ParamInfo(shape=p.shape, dtype=p.dtype, states=p.states, frozen=p.frozen, group=p.group,
                         name=p.name, aliases=aliases)

    def read(self, name: str, state: str = "fp32", *, mp_rank: int | None = None) -> torch.Tensor:
        """One state of one parameter, consolidated over data-parallel ranks, as a new CPU tensor.

        Args:
            name: a parameter name (or a tied alias).
            state: ``param`` (model dtype), ``fp32`` (master weights) or an optimizer state name.
            mp_rank: the model-parallel rank, required when tp or pp > 1.

        Raises:
            KeyError: no such parameter. ConvertError: the state is not saved for it.
            CorruptCheckpointError: a file is shorter than its metadata says.
        """
        plan, p = self._param(name, mp_rank)
        with _structure(f"{self.tag_dir}: {p.name!r} ({state})"):
            return self._read(plan, p, state)

    def _read(self, plan: MpPlan, p: ParamPlan, state: str) -> torch.Tensor:
        if state in p.whole:
            t = self._reader.read(_ref(p.whole[state], p.name))
            if t.numel() != p.numel:
                raise CorruptCheckpointError(f"{p.whole[state].path}: {state} of {p.name!r} has {t.numel()} "
                                             f"elements, expected {p.numel} for shape {list(p.shape)}")
            return t.reshape(p.shape)
        if state not in p.flat_states:
            raise ConvertError(f"{self.tag_dir}: parameter {p.name!r} has no state {state!r} in this checkpoint "
                               f"(available: {', '.join(p.states) or 'none'})")
        return self._gather(plan, p, state)

    def _gather(self, plan: MpPlan, p: ParamPlan, state: str) -> torch.Tensor:
        out, filled = None, 0
        for piece in p.pieces:
            ref = self._source(plan, p, piece.dp_rank, state)
            if out is None:
                out = torch.empty(p.numel, dtype=ref.dtype)
            self._reader.read_into(ref, piece.src_start, out[piece.dst_start:piece.dst_start + piece.count])
            filled += piece.count
        if out is None:
            out = torch.empty(0, dtype=p.dtype if state == "param" else torch.float32)
        if filled != p.numel:
            raise CorruptCheckpointError(f"{self.tag_dir}: {p.name!r} assembled {filled} of {p.numel} elements; "
                                         "the checkpoint's partitions do not cover the parameter")
        return out.view(p.shape)

    def _source(self, plan: MpPlan, p: ParamPlan, dp_rank: int, state: str) -> TensorRef:
        if p.frozen:  # ZeRO-3 frozen parameters: one padded fragment per rank
            return _ref(plan.frozen_frags[dp_rank][p.name], p.name)
        try:
            return _ref(plan.flat_ref(dp_rank, p.slot, state), p.name)
        except (KeyError, IndexError, TypeError):
            raise CorruptCheckpointError(f"{plan.optim_paths[dp_rank]}: no {state!r} for flat group {p.slot} "
                                         f"(holding {p.name!r}); the file is incomplete") from None

    def buffers(self, *, mp_rank: int | None = None) -> dict[str, torch.Tensor]:
        """The model's persistent buffers (as saved: a bf16 model may keep fp32 buffers)."""
        plan = self._plan(mp_rank)
        with _structure(f"{self.tag_dir}: buffers"):
            return {k: self._reader.read(_ref(ref, k)) for k, ref in plan.buffers.items()}

    def param_groups(self) -> list[dict]:
        """The optimizer's param groups' hyper-parameters (lr, betas, eps, weight_decay...), no params."""
        plan = self._plan_at(0)
        with _structure(f"{self.tag_dir}: optimizer param groups"):
            return [{k: v for k, v in g.items() if k != "params"} for g in plan.param_groups]

    def lr_scheduler(self) -> Any:
        """The engine's LR scheduler state as saved (``lr_scheduler``), when JSON holds it; else None."""
        from ucp.core._tree import jsonable

        value = self._load(self._first_model_file()).get("lr_scheduler")
        try:
            return None if value is None or isinstance(value, TensorRef) else jsonable(value)
        except (TypeError, ValueError, AttributeError):  # tensors or objects inside: not carried
            return None

    def _step(self, plan: MpPlan) -> int:
        values = []
        for s in plan.steps:
            if isinstance(s, TensorRef):
                t = self._reader.read(s)
                s = t.item() if t.numel() == 1 else None
            if s is not None:
                values.append(int(s))
        return max(values, default=0)

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the files kept open for reading."""
        self._reader.close()

    def __enter__(self) -> "DeepSpeedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DeepSpeedCheckpoint({self.tag_dir!r}, zero_stage={self.zero_stage}, dp={self.dp_size}, "
                f"tp={self.tp_size}, pp={self.pp_size}, dtype={self.dtype}, step={self.step})")
