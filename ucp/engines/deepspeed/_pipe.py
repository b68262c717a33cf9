"""A ``PipelineModule``'s weights in DeepSpeed's per-layer files (``layer_XX[-model_TT]-model_states.pt``).

A pipeline engine saves no ``module`` in ``mp_rank_XX_model_states.pt``: each stage writes every
layer it owns to its own file, keyed as in that layer's ``state_dict``, while the parameter names
(``param_shapes``) carry the global layer index: ``3.fc.weight`` is key ``fc.weight`` of
``layer_03``. A tied module (``TiedLayerSpec``) is named ``tied_modules.<key>.<rest>``; its file is
the one layer whose keys and shapes are exactly those of the tied module and that no numbered
parameter claims. Keys that no parameter claims are frozen parameters or buffers; the files do not
say which, so they are kept as buffers (the module's ``state_dict`` restores either).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from typing import Any, Callable, Mapping

from ._files import TensorRef

__all__ = ["layer_weights", "pipeline_record"]

log = logging.getLogger("ucp")
_NUMBERED = re.compile(r"(\d+)\.(.+)")
_TIED = re.compile(r"tied_modules\.([^.]+)\.(.+)")


def layer_weights(layers: Mapping[tuple[int, str], str], tp_rank: int, shapes: Mapping[str, tuple[int, ...]],
                  all_names: set[str], load: Callable[[str], Any]) -> tuple[dict[str, TensorRef], dict[str, TensorRef]]:
    """The weights of one stage's parameters, and every unclaimed tensor of the layer files.

    Args:
        layers: layer files by (global layer index, rank suffix). tp_rank: picks ``model_TT`` files.
        shapes: this stage's parameters and their shapes. all_names: every stage's parameter names.
        load: a file's unpickled structure (tensors as :class:`TensorRef`).

    Returns:
        (parameter name -> its tensor, ``<layer>.<key>`` -> an unclaimed tensor).
    """
    files = {i: p for (i, suffix), p in layers.items() if suffix in ("", f"model_{tp_rank:02d}")}
    trees: dict[int, Mapping] = {}

    def tree(i: int) -> Mapping:
        if i not in trees:
            t = load(files[i])
            trees[i] = t if isinstance(t, Mapping) else {}
        return trees[i]

    weights: dict[str, TensorRef] = {}
    for name in shapes:
        m = _NUMBERED.fullmatch(name)
        if m and int(m[1]) in files and isinstance(tree(int(m[1])).get(m[2]), TensorRef):
            weights[name] = tree(int(m[1]))[m[2]]
    claimed = {int(m[1]) for n in all_names if (m := _NUMBERED.fullmatch(n))}
    tied = _tied({n: s for n, s in _all_tied(all_names, shapes)}, [i for i in sorted(files) if i not in claimed], tree)
    weights.update({n: tree(i)[n.split(".", 2)[2]] for n, i in tied.items() if n in shapes})
    extras = OrderedDict()
    for i in sorted(files):
        used = {n.split(".", 1)[1] for n in all_names if n.startswith(f"{i}.")}
        used |= {n.split(".", 2)[2] for n, j in tied.items() if j == i}
        for key, ref in tree(i).items():
            if key not in used and isinstance(ref, TensorRef):
                extras[f"{i}.{key}"] = ref
    return weights, extras


def _all_tied(all_names: set[str], shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...] | None]]:
    """Every tied parameter name of any stage, with its shape where this stage knows it."""
    return [(n, tuple(shapes[n]) if n in shapes else None) for n in sorted(all_names) if _TIED.fullmatch(n)]


def _tied(shapes: Mapping[str, tuple[int, ...] | None], free: list[int],
          tree: Callable[[int], Mapping]) -> dict[str, int]:
    """Tied parameter name -> its layer file: the one unclaimed file whose keys (and the shapes this
    stage knows) are exactly the tied module's."""
    modules: dict[str, dict[str, tuple[int, ...] | None]] = {}
    for name, shape in shapes.items():
        m = _TIED.fullmatch(name)
        modules.setdefault(m[1], {})[m[2]] = shape
    out = {}
    for key, want in modules.items():
        found = [i for i in free if _matches(tree(i), want)]
        if len(found) != 1:  # the fp32 masters still hold it; only the saved model-dtype copy is not attributed
            log.warning("ucp: the layer file of tied module %r is %s; its model-dtype weights are not read",
                        key, "ambiguous" if found else "missing")
            continue
        out.update({f"tied_modules.{key}.{rest}": found[0] for rest in want})
    return out


def _matches(tree: Mapping, want: Mapping[str, tuple[int, ...] | None]) -> bool:
    have = {k: tuple(v.shape) for k, v in tree.items() if isinstance(v, TensorRef)}
    return set(have) == set(want) and all(s is None or have[k] == s for k, s in want.items())


def pipeline_record(ckpt: Any) -> dict[str, Any] | None:
    """What a pipeline target needs from a ``PipelineModule`` checkpoint, as JSON (``ucp convert``
    keeps it in the universal checkpoint's extras, under ``deepspeed.pipeline``), else None:
    ``layer_files`` (the layer indices that have a file), ``tied_files`` (tied module key -> the layer
    file holding its weights) and ``stages`` (each stage's parameter names in its optimizer's order:
    its ``param_shapes``, then any others it holds); only ``tp`` when saved with tp > 1."""
    layers = ckpt.layer_files()
    files = sorted(i for i, suffix in layers if suffix == "")
    if not files:
        return None
    if ckpt.tp_size != 1:  # a pipeline target refuses it
        return {"tp": ckpt.tp_size}
    stages = []
    for stage in range(ckpt.pp_size):
        path = ckpt._files.model[stage]  # noqa: SLF001 - the reader's file index and cached trees
        ordered = [n for group in ckpt._load(path).get("param_shapes") or [] for n in group]  # noqa: SLF001
        stages.append(list(dict.fromkeys(ordered + ckpt.names(mp_rank=stage))))
    names = {n for names in stages for n in names}
    claimed = {int(m[1]) for n in names if (m := _NUMBERED.fullmatch(n))}
    tied = _tied({n: None for n in names if _TIED.fullmatch(n)}, [i for i in files if i not in claimed],
                 lambda i: ckpt._load(layers[(i, "")]))  # noqa: SLF001 - the reader's cached file index
    return {"layer_files": files, "tied_files": {n.split(".")[1]: i for n, i in sorted(tied.items())},
            "stages": stages}
