"""Which saved keys of a Megatron-core ``dist_checkpointing`` (torch_dist) checkpoint hold what.

Megatron saves one flat namespace of sharded keys into a DCP directory (see
``docs/formats/megatron.md``):

* model tensors under their checkpoint keys (``embedding.word_embeddings.weight``,
  ``decoder.final_layernorm.weight``, ``output_layer.weight``); the transformer layers' tensors are
  stacked into one tensor per key with the layer as a leading axis
  (``decoder.layers.self_attention.linear_qkv.weight`` of shape ``[layers, rows, cols]``), each layer
  saved as its own chunk, numbered globally across pipeline stages;
* the distributed optimizer's per-parameter states (``fully_reshardable`` and
  ``fully_sharded_model_space`` formats): ``optimizer.state.<state>.<checkpoint key>`` with the
  parameter's global shape, ``param`` / ``fp32_param`` being the fp32 master copy;
* ``common_state``: one saved Python value with the optimizer's param groups (and their ``step``).

Global shapes are Megatron's tp=1 layout already (QKV interleaved per query group, fc1 ``[gate;
up]``), so the only reshaping is unstacking layers: ``decoder.layers.<i>.<rest of the key>``.
:func:`plan_layout` sorts the keys without reading any data.
"""

from __future__ import annotations

import dataclasses
import re

from ucp.core import ConvertError, CorruptCheckpointError
from ..dcp import DcpMetadata, ObjectEntry, TensorEntry

__all__ = ["Source", "MegatronLayout", "plan_layout", "ucp_name"]

_STATE = re.compile(r"^optimizer\.state\.([A-Za-z0-9_]+)\.(.+)$")
_COMMON = re.compile(r"^common_state(/.*)?$")
_EXTRA = re.compile(r"\._extra_state(/shard_\d+_\d+)?$")
#: Names of the fp32 master copy among the optimizer states (``fully_reshardable``; older format).
MASTER_STATES = ("param", "fp32_param")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a parameter of the tp=1 model lies in the checkpoint.

    Attributes:
        key: the checkpoint key of the (possibly stacked) tensor.
        layer: the index along the stacked leading axis, or None when not stacked.
    """

    key: str
    layer: int | None = None


@dataclasses.dataclass
class MegatronLayout:
    """The checkpoint's keys sorted by role.

    Attributes:
        params: ucp name (Megatron's tp=1 name) -> where it lies, in checkpoint order.
        model: model tensors by checkpoint key.
        states: optimizer tensor states by checkpoint key, then state name (``fp32`` for the master).
        common: the saved common-state values (param groups, step).
    """

    params: dict[str, Source] = dataclasses.field(default_factory=dict)
    model: dict[str, TensorEntry] = dataclasses.field(default_factory=dict)
    states: dict[str, dict[str, TensorEntry]] = dataclasses.field(default_factory=dict)
    common: list[ObjectEntry] = dataclasses.field(default_factory=list)


def stacked_axis(key: str, entry: TensorEntry) -> int | None:
    """The position of the ``layers`` segment when ``entry`` stacks layers along dim 0, else None.

    A key is stacked when a ``layers`` segment is not followed by a layer number and every chunk
    holds one layer (dim 0 of size 1): how Megatron's ``sharded_state_dict`` lays out a
    ``TransformerBlock``'s layers.
    """
    parts = key.split(".")
    at = next((i for i, p in enumerate(parts[:-1]) if p == "layers" and not parts[i + 1].isdigit()), None)
    if at is None or not entry.shape or not all(c.sizes[0] == 1 for c in entry.chunks):
        return None
    return at


def ucp_name(key: str, at: int, layer: int) -> str:
    """``decoder.layers.mlp.linear_fc1.weight``, layer 3 -> ``decoder.layers.3.mlp.linear_fc1.weight``."""
    parts = key.split(".")
    return ".".join(parts[:at + 1] + [str(layer)] + parts[at + 1:])


def _sort(meta: DcpMetadata, where: str) -> tuple[MegatronLayout, list[tuple[str, str, TensorEntry]]]:
    """First pass: model tensors, common state, and the optimizer entries still to be matched."""
    layout = MegatronLayout()
    optim: list[tuple[str, str, TensorEntry]] = []
    for key, e in meta.tensors.items():
        m = _STATE.match(key)
        if m:
            optim.append((m.group(1), m.group(2), e))
        elif key.startswith("optimizer."):
            raise ConvertError(
                f"{where}: optimizer entry {key!r} is not a per-parameter state: the distributed "
                "optimizer was saved with distrib_optim_sharding_type='dp_reshardable' (flat DP buffers, "
                "Megatron-LM's default), which ucp does not read yet; save with "
                "--dist-ckpt-optim-fully-reshardable (metadata distrib_optim_sharding_type="
                "'fully_reshardable') to convert it")
        else:
            layout.model[key] = e
    for key, o in meta.objects.items():
        if _COMMON.match(key):
            layout.common.append(o)
    return layout, optim


def plan_layout(meta: DcpMetadata, *, where: str) -> MegatronLayout:
    """Sorts the entries of a Megatron torch_dist checkpoint's metadata.

    Raises:
        ConvertError: a layout this reader does not handle (``dp_reshardable`` optimizer state).
        CorruptCheckpointError: an optimizer state for a key the model lacks, or of another shape.
    """
    layout, optim = _sort(meta, where)
    if not layout.model:
        raise ConvertError(f"{where}: no model tensors among the checkpoint's keys; this is not a "
                           "Megatron-core model checkpoint")
    for state, key, e in optim:
        model = layout.model.get(key)
        if model is None or model.shape != e.shape:
            what = "no model tensor" if model is None else f"model tensor of shape {list(model.shape)}"
            raise CorruptCheckpointError(f"{where}: optimizer state {e.key!r} of shape {list(e.shape)} "
                                         f"belongs to {what} {key!r}; the checkpoint is inconsistent")
        layout.states.setdefault(key, {})["fp32" if state in MASTER_STATES else state] = e
    for key, e in layout.model.items():
        at = stacked_axis(key, e)
        if at is None:
            layout.params[key] = Source(key)
            continue
        for layer in range(e.shape[0]):
            name = ucp_name(key, at, layer)
            if name in layout.model:
                raise CorruptCheckpointError(f"{where}: layer {layer} of the stacked {key!r} and the "
                                             f"saved {name!r} are the same parameter")
            layout.params[name] = Source(key, layer)
    return layout
