"""Reshard target ``"deepspeed-universal"``: DeepSpeed's own universal-checkpoint layout.

(``engine="deepspeed"`` writes DeepSpeed's native ZeRO files instead: see ``_native``.)

DeepSpeed (>= 0.10) loads a *universal* checkpoint onto any data-parallel size when its config
says ``"checkpoint": {"load_universal": true}``: each rank cuts its ZeRO partition out of whole
per-parameter tensors at load time. So the files hold no DP partitioning at all, and the target
topology only has to be one DeepSpeed can repartition (tp = pp = 1, ZeRO stage 0-2)::

    DST/latest_universal                       the tag (written last: the commit)
    DST/<tag>/mp_rank_00_model_states.pt        module state dict (weights, frozen params, buffers)
                                                and the engine's counters
    DST/<tag>/zero/optimizer_state.pt           param groups (hyper-parameters), ds_version
    DST/<tag>/zero/<param>/fp32.pt              {"param": fp32 master, "cat_dim": 0}
    DST/<tag>/zero/<param>/<state>.pt           exp_avg, exp_avg_sq, ... likewise
    DST/<tag>/zero/<param>/step.pt              the optimizer step (a float tensor)

These are the files ``deepspeed.checkpoint.ds_to_universal`` writes and
``DeepSpeedEngine.load_checkpoint`` reads (checked against DeepSpeed 0.19.8). They are DeepSpeed's
pickled format, not ucp's; they hold only tensors, dicts, lists, numbers and ``torch.Size``.

DeepSpeed's universal load restores only what its optimizer owns: frozen parameters and buffers
keep the values the model was built with. :func:`ucp.restore_deepspeed_extras` copies them from
``mp_rank_00_model_states.pt`` into the live engine.
"""

from __future__ import annotations

import io
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import torch

from ucp.core._coord import get_coordinator
from ucp.core._errors import CheckpointExistsError, TopologyError
from ucp.core._topology import Topology
from ucp.grammar import Spec
from ucp.storage import Storage

from ucp.resharder import ArraySource, ReadStats, ReshardReport, check_recorded, register_target
from ucp.resharder._source import aliases_of

__all__ = ["DeepSpeedTarget", "MODEL_FILE", "LATEST", "tag_for"]

MODEL_FILE = "mp_rank_00_model_states.pt"
LATEST = "latest_universal"
#: The DeepSpeed version whose loader this layout was checked against; DeepSpeed asserts that
#: ``ds_version`` is present and at least 0.3.17 for ZeRO-1.
DS_FORMAT_VERSION = "0.19.8"


def tag_for(step: int) -> str:
    """DeepSpeed's default tag for a step (``global_step<N>``)."""
    return f"global_step{step}"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def check_topology(topology: Topology) -> None:
    """DeepSpeed's universal load repartitions over dp only; refuse what it cannot take.

    Raises:
        TopologyError: tp/pp/ep/sp above 1, or ZeRO stage 3.
    """
    others = {ax: getattr(topology, ax) for ax in ("tp", "pp", "ep", "sp") if getattr(topology, ax, 1) != 1}
    if others:
        raise TopologyError(f"engine='deepspeed-universal' writes a data-parallel universal checkpoint, but the "
                            f"target topology {topology} has {others}; use tp=pp=1 (Megatron-style "
                            "tp/pp under DeepSpeed is not supported yet)")
    if topology.zero == 3:
        raise TopologyError(f"engine='deepspeed-universal' supports ZeRO stages 0-2 (the target is {topology}); "
                            "ZeRO-3's universal load is not supported yet: reshard with zero=2 and "
                            "load it into a stage 1/2 engine, or use engine='ucp'")


class DeepSpeedTarget:
    """Writes DeepSpeed's universal layout (see the module docstring) for a dp-only topology.

    Called by one process, or by every process of a torchrun job: parameters are shared out
    round-robin, and process 0 writes the model file, the optimizer file and ``latest_universal``
    (the commit) once every process finished its parameters.
    """

    name = "deepspeed-universal"
    default_alignment = 1  # DeepSpeed partitions (and aligns) at load time, not on disk

    def write(self, source: ArraySource, dst: str, *, topology: Topology, spec: Spec | None,
              alignment: int, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, workers: int,
              progress: bool, verify: bool = False) -> ReshardReport:
        """``verify``: each state written (a whole fp32 copy) must have the fingerprint a universal
        ``source`` records for it (states stored in another dtype, and sources without recorded
        fingerprints, are not checked)."""
        start = time.perf_counter()
        check_topology(topology)  # before any I/O
        storage, tag = Storage(dst, storage_options=storage_options), tag_for(step)
        coord = get_coordinator(600.0)
        if storage.exists(f"{tag}/{MODEL_FILE}"):
            if not overwrite:
                raise CheckpointExistsError(f"{dst} already holds DeepSpeed tag {tag}; pass overwrite=True "
                                            "(--overwrite) to replace it")
            if coord.rank == 0:  # uncommitted while its files are replaced
                storage.delete(LATEST)
                storage.delete(f"{tag}/{MODEL_FILE}")
        coord.all_gather_json(None, what="starting to reshard for DeepSpeed")
        trainable = [n for n in source.names() if not source.info(n).frozen]
        aliases = aliases_of(source)
        mine = trainable[coord.rank::coord.world_size]
        stats = _write_params(storage, source, mine, aliases, tag=tag, step=step, workers=workers,
                              progress=progress, verify=verify)
        coord.all_gather_json(None, what="gathering DeepSpeed parameter files")
        if coord.rank == 0:
            storage.write(f"{tag}/zero/optimizer_state.pt", _torch_bytes(_optimizer_state(source)))
            storage.write(f"{tag}/{MODEL_FILE}", _torch_bytes(_model_state(source, topology, step, aliases)))
            storage.write(LATEST, tag.encode())
        coord.all_gather_json(None, what="committing the DeepSpeed checkpoint")
        return ReshardReport(dst, self.name, topology, step, (coord.rank,), stats,
                             time.perf_counter() - start)


def _write_params(storage: Storage, source: ArraySource, names: list[str], aliases: dict[str, str], *,
                  tag: str, step: int, workers: int, progress: bool, verify: bool = False) -> ReadStats:
    """``zero/<name>/<state>.pt`` for each of ``names`` (and each alias of it), one parameter in
    memory per worker."""
    by_target: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        by_target.setdefault(target, []).append(alias)

    def one(name: str) -> ReadStats:
        t0, info = time.perf_counter(), source.info(name)
        states = [s for s in info.states if s != "param"]
        if "fp32" not in info.states:  # an fp32 model's weights are its masters
            states.insert(0, "param")
        nbytes = 0
        for state in states:
            tensor = source.read(name, state, None).float().contiguous()
            if verify:
                check_recorded(source, name, state, tensor, f"{storage.url}/{tag}/zero/{name}")
            nbytes += tensor.numel() * tensor.element_size()
            data = _torch_bytes({"param": tensor, "cat_dim": 0})
            for path in [name, *by_target.get(name, [])]:
                key = "fp32" if state == "param" else state
                storage.write(f"{tag}/zero/{path}/{key}.pt", data)
        step_bytes = _torch_bytes(torch.tensor(float(step)))
        for path in [name, *by_target.get(name, [])]:
            storage.write(f"{tag}/zero/{path}/step.pt", step_bytes)
        return ReadStats(nbytes, nbytes, 0, len(states), time.perf_counter() - t0)

    from tqdm import tqdm

    stats = ReadStats()
    pool_size = max(1, workers if getattr(source, "concurrent", True) else 1)
    with ThreadPoolExecutor(pool_size) as pool:
        for s in tqdm(pool.map(one, names), total=len(names), desc="reshard (deepspeed)", unit="param",
                      file=sys.stderr, disable=not progress):
            stats = stats + s
    return stats


def _optimizer_state(source: ArraySource) -> dict[str, Any]:
    """``zero/optimizer_state.pt``: what DeepSpeed's ``_load_global_state`` and param-group copy
    read. The loss scaler and clip value are left out on purpose: the loading engine keeps its
    own (they come from its config)."""
    groups = []
    for i, group in enumerate(source.param_groups):
        g = {k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in group.items()
             if k != "params"}
        groups.append({**g, "params": [i]})
    return {"param_groups": groups, "ds_version": DS_FORMAT_VERSION}


def _model_state(source: ArraySource, topology: Topology, step: int,
                 aliases: dict[str, str]) -> dict[str, Any]:
    """``mp_rank_00_model_states.pt``: DeepSpeed's model file, with every weight in model dtype."""
    module: OrderedDict[str, torch.Tensor] = OrderedDict()
    frozen: OrderedDict[str, torch.Size] = OrderedDict()
    shapes: list[OrderedDict[str, torch.Size]] = [OrderedDict() for _ in source.param_groups]
    for name in source.names():
        info = source.info(name)
        state = "param" if "param" in info.states else "fp32"
        module[name] = source.read(name, state, None).to(info.dtype or torch.float32).contiguous()
        if info.frozen:
            frozen[name] = module[name].shape
        elif info.group is not None and info.group < len(shapes):
            shapes[info.group][name] = module[name].shape
    for alias, target in aliases.items():
        module[alias] = module[target]  # torch.save keeps the sharing
    buffers = source.buffer_names()
    for name in buffers:
        module[name] = source.read(name, None, None).contiguous()
    return {
        "module": module, "buffer_names": buffers, "param_shapes": shapes,
        "frozen_param_shapes": frozen or None, "frozen_param_fragments": OrderedDict(
            (n, module[n]) for n in frozen) or None,
        "shared_params": dict(aliases), "optimizer": None, "lr_scheduler": None, "data_sampler": None,
        "random_ltd": None, "skipped_steps": 0, "global_steps": step, "dp_world_size": topology.dp,
        "mp_world_size": 1, "checkpoint_parallel_dimensions": {"tp_degree": 1, "pp_degree": 1},
        "ds_version": DS_FORMAT_VERSION, "universal_checkpoint_info": {},
        "ucp": {"source": source.url, "topology": str(topology)},
    }


register_target(DeepSpeedTarget())
