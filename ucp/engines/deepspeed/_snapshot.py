"""A live DeepSpeed ZeRO-1/2 engine's state as a ucp native save, and that save read back.

:func:`capture` takes, on each rank, what DeepSpeed itself writes to its
``zero_pp_rank_D_mp_rank_00_optim_states.pt`` and ``mp_rank_00_model_states.pt`` files, as a
nested dict of tensors and plain values for :func:`ucp.save` (no pickle)::

    {"meta":   {"format": "ucp.deepspeed-zero", "version": 1, "stage", "dp_size", "dp_rank",
                "param_shapes": [[[name, shape], ...] per flat group], "paddings", "frozen",
                "buffers", "shared", "global_steps", "global_samples", "skipped_steps", ...},
     "fp32":   [this rank's fp32 master partition of each flat group, alignment padding removed],
     "optim":  [the base optimizer's state of each flat group (exp_avg, ..., step), likewise],
     "param_groups": [hyper-parameters of each group (lr, betas, ...), no params],
     "module": the module's state dict (weights, frozen parameters, buffers), rank 0 only,
     "lr_scheduler": its state dict or None, "rng": this rank's RNG states,
     "client": the caller's client state, "step": the training step}

:class:`DeepSpeedSnapshot` reads a committed step of such saves as a conversion source
(``names`` / ``info`` / ``read`` per parameter, consolidated over the saving data-parallel ranks
with the ZeRO-1/2 partition math of :mod:`ucp.engines.deepspeed._layout`), so ``ucp.reshard`` can
lay it out for any data-parallel size.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections import OrderedDict
from typing import Any, Mapping

import torch

from ucp.core._errors import CorruptCheckpointError, UcpError
from ucp.native._layout import read_manifest
from ucp.core._topology import Topology
from .._base import ParamInfo, Region
from ._layout import _zero12_group
from ucp.storage import Storage

__all__ = ["FORMAT", "capture", "DeepSpeedSnapshot", "restore_rng"]

FORMAT = "ucp.deepspeed-zero"
VERSION = 1


def _zero_parts(engine: Any) -> tuple[list[torch.Tensor], list[int], list[list[int]] | None, int]:
    """The fp32 partitions, their trailing paddings, the per-parameter alignment paddings and the
    ZeRO stage of ``engine``'s optimizer (DeepSpeedZeroOptimizer, or BF16_Optimizer for bf16
    ZeRO-1 with fp32 gradient accumulation)."""
    opt = engine.optimizer
    stage = int(engine.zero_optimization_stage())
    if stage in (1, 2) and hasattr(opt, "single_partition_of_fp32_groups"):
        return (list(opt.single_partition_of_fp32_groups), list(opt.groups_padding),
                [list(p) for p in opt.round_robin_bit16_padding], stage)
    if stage == 1 and hasattr(opt, "fp32_groups_flat_partition"):
        return list(opt.fp32_groups_flat_partition), list(opt.group_paddings), None, 1
    raise UcpError(f"DeepSpeedCheckpointer supports ZeRO stages 1 and 2 (this engine: stage {stage}, "
                   f"optimizer {type(opt).__name__}); use zero_optimization.stage 1 or 2")


def _dp_rank_and_size(engine: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if getattr(engine, "mp_world_size", 1) != 1 or getattr(engine, "pipeline_parallelism", False):
        raise UcpError("DeepSpeedCheckpointer supports data parallelism only (tp = pp = 1); this engine "
                       f"has mp_world_size={engine.mp_world_size}")
    counts = set(engine.optimizer.partition_count)
    if len(counts) != 1:
        raise UcpError(f"param groups are partitioned over different data-parallel sizes ({sorted(counts)}), "
                       "as with MoE experts; not supported by DeepSpeedCheckpointer")
    group = engine.optimizer.real_dp_process_group[0]
    return dist.get_rank(group=group), counts.pop()


def _lean(t: torch.Tensor, padding: int) -> torch.Tensor:
    """``t`` without its trailing alignment padding (a view: ucp.save stages the copy)."""
    return t.detach()[: t.numel() - padding] if t.dim() > 0 else t.detach()


def _rng_state() -> dict[str, Any]:
    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
                           "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Sets this process's torch / CUDA / Python / NumPy RNG states from :func:`capture`'s."""
    import numpy as np

    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


def capture(engine: Any, *, step: int, client_state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This rank's DeepSpeed state, for :func:`ucp.save` (tensors are the live ones: ``ucp.save``
    copies them while staging). Each rank calls it for itself (no collective).

    Raises:
        UcpError: an engine layout the snapshot does not cover (ZeRO-0/3, tp/pp, MoE).
    """
    fp32, group_pads, param_pads, stage = _zero_parts(engine)
    dp_rank, dp_size = _dp_rank_and_size(engine)
    base = engine.optimizer.optimizer
    optim = []
    for g, group in enumerate(base.param_groups):
        state = base.state.get(group["params"][0], {})
        optim.append({k: (_lean(v, group_pads[g]) if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    shapes = engine._get_zero_param_shapes()  # noqa: SLF001 - what DeepSpeed's own save records
    meta = {
        "format": FORMAT, "version": VERSION, "stage": stage, "dp_size": dp_size, "dp_rank": dp_rank,
        "param_shapes": [[[n, list(s)] for n, s in g.items()] for g in shapes],
        "paddings": param_pads,
        "frozen": list(engine._get_zero_frozen_param_attributes(engine._get_param_shape_func)),  # noqa: SLF001
        "buffers": list(engine._get_buffer_names()),  # noqa: SLF001
        "shared": dict(engine._get_shared_params()),  # noqa: SLF001
        "global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps), "ds_version": _ds_version(),
    }
    sched = getattr(engine, "lr_scheduler", None)
    return {
        "meta": meta, "step": step,
        "fp32": [_lean(t, p) for t, p in zip(fp32, group_pads)],
        "optim": optim,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
        "module": engine.module.state_dict() if dp_rank == 0 else None,
        "lr_scheduler": sched.state_dict() if sched is not None else None,
        "rng": _rng_state(),
        "client": dict(client_state or {}),
    }


def _ds_version() -> str:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except ImportError:  # pragma: no cover - capture() is only called with a live engine
        return "unknown"


@dataclasses.dataclass(frozen=True)
class _Ref:
    """What ``_zero12_group`` checks of a partition: its length, and a name for its messages."""

    numel: int
    path: str


class DeepSpeedSnapshot:
    """One committed step of :func:`capture` saves, read parameter by parameter.

    A conversion source (``ucp.engines`` protocol): ``ucp.reshard(snapshot, dst, ...)`` lays it out
    for another topology, and ``DeepSpeedCheckpointer.resume`` loads it into a live engine. Opening
    reads metadata only; a read of a region of a parameter fetches only the parts of the saving
    ranks' flat partitions that hold it.

    Args:
        url: the checkpoint root given to ``ucp.save``.
        step: a committed step.

    Raises:
        CheckpointNotFoundError: ``step`` is not committed.
        CorruptCheckpointError: the step is not a DeepSpeed snapshot, or its ranks disagree.
    """

    engine = "deepspeed-snapshot"
    partial_reads = True

    def __init__(self, url: str, step: int, *, storage_options: Mapping[str, Any] | None = None) -> None:
        from ucp.native._source import NativeCheckpoint

        self.url = url
        storage = Storage(url, storage_options=storage_options)
        self.raw = NativeCheckpoint(storage, read_manifest(storage, step))
        where = f"{url} step {step}"
        trees = [self.raw.tree(r) for r in range(self.raw.manifest.world_size)]
        metas = [t.get("meta") if isinstance(t, dict) else None for t in trees]
        if not all(isinstance(m, dict) and m.get("format") == FORMAT for m in metas):
            raise CorruptCheckpointError(f"{where}: not a DeepSpeedCheckpointer save (no {FORMAT!r} meta); "
                                         "open it with ucp.load or ucp.convert instead")
        if metas[0].get("version") != VERSION:
            raise CorruptCheckpointError(f"{where}: snapshot format version {metas[0].get('version')}; this "
                                         f"ucp reads version {VERSION}; upgrade ucp")
        by_dp = {m["dp_rank"]: r for r, m in enumerate(metas)}
        self.meta, self.dp_size = self.raw.read_subtree(0, "meta"), int(metas[0]["dp_size"])
        if sorted(by_dp) != list(range(self.dp_size)):
            raise CorruptCheckpointError(f"{where}: dp ranks {sorted(by_dp)} saved, expected 0..{self.dp_size - 1}")
        self.ranks = [by_dp[r] for r in range(self.dp_size)]  # the saving rank of each dp rank
        self._trees = [trees[r] for r in self.ranks]
        self.stage = int(self.meta["stage"])
        self.step = self._optimizer_step()
        self.topology = Topology(dp=self.dp_size, zero=self.stage)
        self._module = _keys(self._trees[0].get("module"), where)
        self._plan(where)

    def _optimizer_step(self) -> int:
        """The base optimizer's step (the first group that has one), reading only that value."""
        for g, state in enumerate(self._trees[0].get("optim") or []):
            s = state.get("step") if isinstance(state, dict) else None
            if isinstance(s, dict) and "@t" in s:
                return int(self.raw.read_saved(self.ranks[0], s["@t"]).item())
            if isinstance(s, (int, float)):
                return int(s)
        return 0

    def saved(self, dp_rank: int, key: str) -> Any:
        """``state[key]`` as dp rank ``dp_rank`` saved it (e.g. ``"lr_scheduler"``, ``"rng"``)."""
        return self.raw.read_subtree(self.ranks[dp_rank], key)

    def _plan(self, where: str) -> None:
        self._params: dict[str, tuple[int, tuple[int, ...], tuple]] = {}
        paddings = self.meta["paddings"]
        for g, group in enumerate(self.meta["param_shapes"]):
            shapes = OrderedDict((n, tuple(s)) for n, s in group)
            refs = [_Ref(math.prod(self.raw.fragment(r, self._flat_key(d, g, "fp32")).shape),
                         f"{where}, dp rank {d}") for d, r in enumerate(self.ranks)]
            try:
                pieces = _zero12_group(0, g, shapes, None if paddings is None else paddings[g], self.dp_size, refs)
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise CorruptCheckpointError(f"{where}: flat group {g} does not match its parameter shapes: {e}") from e
            for name, shape in shapes.items():
                self._params[name] = (g, shape, pieces[name])
        skip = set(self.meta["buffers"]) | set(self.meta["shared"])
        self._frozen = [n for n in self._module if n not in skip and n not in self._params]
        self._names = [n for n in self._module if n in self._params or n in self._frozen]
        self._names += [n for n in self._params if n not in self._module]

    def _flat_key(self, dp_rank: int, g: int, state: str) -> str:
        """The tensor key of flat group ``g``'s ``state`` (``fp32`` or an optimizer state)."""
        tree = self._trees[dp_rank]
        try:
            ref = tree["fp32"][g] if state == "fp32" else tree["optim"][g][state]
            return ref["@t"]
        except (KeyError, IndexError, TypeError) as e:
            raise CorruptCheckpointError(f"{self.url}: dp rank {dp_rank} saved no {state!r} tensor of flat "
                                         f"group {g}; the snapshot is inconsistent") from e

    def names(self) -> list[str]:
        """Trainable and frozen parameter names in the module's order (tied aliases left out)."""
        return list(self._names)

    def shared_params(self) -> dict[str, str]:
        """Tied parameters: alias -> the name :meth:`names` lists."""
        return dict(self.meta["shared"])

    def aliases(self) -> dict[str, str]:
        """Tied weights (alias -> name), as ``ucp convert`` records them."""
        return self.shared_params()

    def info(self, name: str) -> ParamInfo:
        if name in self._params:
            g, shape, _ = self._params[name]
            optim = self._trees[0]["optim"][g]
            flat = tuple(k for k, v in optim.items() if isinstance(v, dict) and "@t" in v
                         and len(self.raw.fragment(self.ranks[0], v["@t"]).shape) == 1)
            dtype = self._dtype(name) if name in self._module else torch.float32
            return ParamInfo(shape=shape, dtype=dtype, states=("param", "fp32") + flat, frozen=False, group=g)
        if name in self._frozen:
            frag = self.raw.fragment(self.ranks[0], self._module[name])
            return ParamInfo(shape=tuple(frag.shape), dtype=self._dtype(name), states=("param",), frozen=True,
                             group=None)
        raise KeyError(f"{self.url}: no parameter {name!r} in this DeepSpeed snapshot (see names())")

    def _dtype(self, name: str) -> torch.dtype:
        from ucp.core._stfile import dtype_from_name

        return dtype_from_name(self.raw.fragment(self.ranks[0], self._module[name]).dtype)

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        """One state of one parameter (or ``region`` of it), gathered from the saving ranks' flat
        partitions, reading only the parts of them that hold it."""
        info = self.info(name)
        if state == "param":
            return self.raw.read_saved(self.ranks[0], self._module[name], region)
        if state not in info.states:
            raise KeyError(f"{self.url}: parameter {name!r} has no state {state!r} (has {info.states})")
        g, shape, pieces = self._params[name]
        region = region if region is not None else tuple((0, n) for n in shape)
        out = torch.empty([b - a for a, b in region], dtype=torch.float32)
        flat, at = out.view(-1), 0
        for lo, hi in flat_runs(shape, region):
            for p in pieces:
                a, b = max(lo, p.dst_start), min(hi, p.dst_start + p.count)
                if a < b:
                    src = a - p.dst_start + p.src_start
                    key = self._flat_key(p.dp_rank, g, state)
                    flat[at + a - lo:at + b - lo] = self.raw.read_saved(self.ranks[p.dp_rank], key,
                                                                        ((src, src + b - a),))
            at += hi - lo
        return out

    def iter_region(self, name: str, state: str, region: Region) -> Any:
        yield region, self.read(name, state, region)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {b: self.raw.read_saved(self.ranks[0], self._module[b])
                for b in self.meta["buffers"] if b in self._module}

    def param_groups(self) -> list[dict[str, Any]]:
        return [dict(g) for g in self.saved(0, "param_groups")]


def _keys(module: Any, where: str) -> dict[str, str]:
    """The tensor key of each entry of a saved module state dict."""
    if not isinstance(module, dict) or not all(isinstance(v, dict) and "@t" in v for v in module.values()):
        raise CorruptCheckpointError(f"{where}: the saving dp rank 0 has no module state dict; the "
                                     "snapshot is incomplete")
    return {k: v["@t"] for k, v in module.items()}


def flat_runs(shape: tuple[int, ...], region: Region) -> list[tuple[int, int]]:
    """The row-major flat ranges ``[start, stop)`` that make up ``region`` of a tensor, in order."""
    if not shape:
        return [(0, 1)]
    k = len(shape) - 1  # the box is whole in every dim after k: runs span dims k..
    while k > 0 and region[k] == (0, shape[k]):
        k -= 1
    inner = math.prod(shape[k + 1:])
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    (a, b) = region[k]
    runs = []
    for idx in itertools.product(*(range(lo, hi) for lo, hi in region[:k])):
        base = sum(i * s for i, s in zip(idx, strides))
        runs.append((base + a * inner, base + b * inner))
    return runs
