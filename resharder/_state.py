"""A rank's resharded state dict, in ucp's own layout (docs/resharding.md has the full table).

::

    {"model": {local name: tensor},                  # zero 3: a 1-D partition of the flattened tensor
     "optim": {"state": {local name: {state: tensor}},
               "param_groups": [{**hyper-parameters, "params": [local name, ...]}],
               "flat": [{state: 1-D partition}, ...]},  # zero 1/2 only, one per param group
     "step": int | None,
     "layout": {...}}                                # how the tensors above are cut (JSON only)

This is the structure ``torch.distributed.checkpoint.state_dict.get_state_dict`` uses (and
``ucp convert`` reads) for zero 0, extended by flat partitions for ZeRO.
"""

from __future__ import annotations

from typing import Any

from ._plan import RankPlan
from ._read import LoadedRank

__all__ = ["build_state", "layout_table", "LAYOUT_FORMAT"]

LAYOUT_FORMAT = "ucp-reshard"


def layout_table(plan: RankPlan) -> dict[str, Any]:
    """The ``layout`` entry: the target topology, and how every tensor of the rank is cut."""
    params: dict[str, Any] = {}
    for h in plan.params:
        entry: dict[str, Any] = {"name": h.name, "shape": list(h.shape),
                                 "local_shape": list(h.local_shape), "group": h.group}
        if h.partition is not None:
            entry["partition"] = list(h.partition)
        params[h.local_name] = entry
    out: dict[str, Any] = {"format": LAYOUT_FORMAT, "format_version": 1,
                           "topology": str(plan.topology), "rank": plan.rank,
                           "zero": plan.topology.zero, "alignment": plan.alignment,
                           "params": params, "buffers": {local: name for name, local in plan.buffers}}
    if plan.topology.zero in (1, 2):
        out["groups"] = [{"numel": g.numel, "padded_numel": g.padded_numel,
                          "partition": list(g.partition or (0, 0)),
                          "segments": [[s.local_name, s.start, s.stop, s.offset] for s in g.segments]}
                         for g in plan.groups]
    return out


def build_state(loaded: LoadedRank, *, step: int | None) -> dict[str, Any]:
    """The nested state dict of a read plan (tensors are shared, not copied)."""
    plan, t = loaded.plan, loaded.tensors
    model = {h.local_name: t[("model", h.local_name)] for h in plan.params}
    model.update({local: t[("model", local)] for _name, local in plan.buffers})
    out: dict[str, Any] = {"model": model}
    if plan.groups:
        state: dict[str, dict[str, Any]] = {}
        for h in plan.params:
            for s in h.states:
                path = ("optim", "state", h.local_name, s)
                if path in t:
                    state.setdefault(h.local_name, {})[s] = t[path]
        optim: dict[str, Any] = {"state": state,
                                 "param_groups": [{**g.hyper, "params": list(g.params)}
                                                  for g in plan.groups]}
        if plan.topology.zero in (1, 2):
            optim["flat"] = [{p[3]: t[p] for p in t if p[:3] == ("optim", "flat", g.index)}
                             for g in plan.groups]
        out["optim"] = optim
    out["step"] = step
    out["layout"] = layout_table(plan)
    return out
