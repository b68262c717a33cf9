"""Where a model's parameters, optimizer states and param groups sit among a DCP checkpoint's keys.

DCP flattens the saved state dict into dotted keys and records each key's path (the tuple of dict
keys and list indices leading to it). :func:`plan_layout` sorts those paths into sections, without
reading any data. The state dict is expected to look like what training loops save with
``torch.distributed.checkpoint.state_dict.get_state_dict(model, optimizer)``::

    {"model": model_state_dict, "optim": optimizer_state_dict, ...anything else...}

``"optim"`` may also be spelled ``"optimizer"``; with neither (and no ``"model"``), the whole
checkpoint is taken as a model state dict. With an optimizer key but no ``"model"``, the model's
tensors are the top-level entries beside it (torchtitan's ``CheckpointManager`` saves
``{**model_state_dict, "optimizer": ..., "lr_scheduler": ..., "train_state": ...}``), and
torchtitan's fused ``wqkv`` optimizer states are moved onto the saved ``wq``/``wk``/``wv`` (see
``_fused``). The optimizer state dict comes in two layouts:

* nested (the default): ``state.<fqn>.<state>`` and ``param_groups.<i>.<hyper-parameter>`` with
  ``param_groups.<i>.params`` listing the group's parameter FQNs;
* flattened (``StateDictOptions(flatten_optimizer_state_dict=True)``): ``state.<fqn>.<state>`` and
  ``param_groups.<fqn>.<hyper-parameter>`` per parameter, with no group indices.
"""

from __future__ import annotations

import dataclasses

from ucp.core._errors import ConvertError, CorruptCheckpointError
from ._fused import fused_names, unfuse
from ._meta import DcpMetadata, KeyPath, ObjectEntry, TensorEntry

__all__ = ["Layout", "plan_layout", "MODEL_KEYS", "OPTIM_KEYS"]

MODEL_KEYS = ("model",)
OPTIM_KEYS = ("optim", "optimizer")

Entry = TensorEntry | ObjectEntry


@dataclasses.dataclass
class Layout:
    """The checkpoint's entries sorted by role (keys are model FQNs unless said otherwise).

    Attributes:
        model_key, optim_key: the top-level keys used ('' for a bare model state dict; None: absent).
        model: model tensors by FQN.
        states: optimizer states by FQN, then state name (``step`` included).
        groups: nested layout: hyper-parameter entries of each group, by group index.
        members: nested layout: the ``params`` entry of each group, by group index.
        per_param: flattened layout: hyper-parameter entries of each parameter.
        extras: entries outside the model and optimizer sections, by their full key.
        fused: torchtitan's fused parameters whose optimizer states were moved onto their parts
            (fused FQN -> the parts' FQNs).
    """

    model_key: str | None
    optim_key: str | None
    model: dict[str, TensorEntry] = dataclasses.field(default_factory=dict)
    states: dict[str, dict[str, Entry]] = dataclasses.field(default_factory=dict)
    groups: dict[int, dict[str, Entry]] = dataclasses.field(default_factory=dict)
    members: dict[int, ObjectEntry] = dataclasses.field(default_factory=dict)
    per_param: dict[str, dict[str, Entry]] = dataclasses.field(default_factory=dict)
    extras: dict[str, Entry] = dataclasses.field(default_factory=dict)
    fused: dict[str, tuple[str, str, str]] = dataclasses.field(default_factory=dict)

    @property
    def flattened(self) -> bool:
        return bool(self.per_param)


def _pick(heads: set[str], wanted: str | None, candidates: tuple[str, ...], what: str,
          where: str) -> str | None:
    if wanted is not None:
        if wanted not in heads:
            raise ConvertError(f"{where}: no top-level key {wanted!r} for the {what}; the checkpoint's "
                               f"top-level keys are {sorted(heads)}")
        return wanted
    found = [c for c in candidates if c in heads]
    if len(found) > 1:
        raise ConvertError(f"{where}: both {found[0]!r} and {found[1]!r} look like the {what}; "
                           f"say which with {what.split()[0]}_key=")
    return found[0] if found else None


def plan_layout(meta: DcpMetadata, *, where: str, model_key: str | None = None,
                optim_key: str | None = None) -> Layout:
    """Sorts every entry of ``meta`` into the model, optimizer and extra sections.

    Args:
        meta: the checked metadata.
        where: the checkpoint's location, for messages.
        model_key, optim_key: the top-level keys to use instead of detecting them.

    Raises:
        ConvertError: the keys cannot be told apart (no model section, ambiguous keys).
        CorruptCheckpointError: optimizer entries name parameters the model section lacks.
    """
    entries: dict[str, Entry] = {**meta.tensors, **meta.objects}
    heads = {str(e.path[0]) for e in entries.values()}
    mk = _pick(heads, model_key, MODEL_KEYS, "model state dict", where)
    ok = _pick(heads, optim_key, OPTIM_KEYS, "optim state dict", where)
    if mk is None and (ok is None or _flat_model(entries, ok)):
        mk = ""  # a bare model state dict (dcp.save(model.state_dict())), or torchtitan's flat one
    if mk is None:
        raise ConvertError(f"{where}: an optimizer section {ok!r} but no model section among the "
                           f"top-level keys {sorted(heads)}; pass model_key=")
    layout = Layout(model_key=mk, optim_key=ok)
    optim: list[tuple[KeyPath, Entry]] = []
    for key, e in entries.items():
        head = str(e.path[0])
        if mk == "" and isinstance(e, TensorEntry) and (ok is None or len(e.path) == 1 and head != ok):
            layout.model[key] = e
        elif head == mk and len(e.path) > 1:
            if isinstance(e, TensorEntry):
                layout.model[".".join(map(str, e.path[1:]))] = e
            else:
                layout.extras[key] = e  # e.g. a module's _extra_state
        elif head == ok and len(e.path) > 1:
            optim.append((e.path[1:], e))
        else:
            layout.extras[key] = e
    if not layout.model:
        raise ConvertError(f"{where}: the model section {mk!r} holds no tensors")
    layout.fused = fused_names(layout.model)
    finder = _FqnFinder({**layout.model, **dict.fromkeys(layout.fused)})
    for path, e in optim:
        _place(layout, path, e, finder, where)
    unfuse(layout.states, layout.per_param, layout.fused, layout.model, where)
    return layout


def _flat_model(entries: dict[str, Entry], optim_key: str) -> bool:
    """Whether model tensors sit at the top level beside the optimizer key (torchtitan)."""
    return any(isinstance(e, TensorEntry) and len(e.path) == 1 and e.path[0] != optim_key
               for e in entries.values())


class _FqnFinder:
    """Splits ``<fqn>.<rest>`` where the FQN itself contains dots (the longest model FQN wins)."""

    def __init__(self, fqns: dict[str, TensorEntry | None]) -> None:
        self.fqns = fqns

    def split(self, text: str) -> tuple[str, str] | None:
        cut = len(text)
        while (cut := text.rfind(".", 0, cut)) > 0:
            if text[:cut] in self.fqns:
                return text[:cut], text[cut + 1:]
        return None


def _place(layout: Layout, path: KeyPath, e: Entry, finder: _FqnFinder, where: str) -> None:
    """Files one optimizer entry (``path`` is below the optimizer key)."""
    section = str(path[0])
    rest = path[1:]
    if len(path) == 1:  # flattened: one dotted string, "state.<fqn>.<name>" / "param_groups.<fqn>.<hp>"
        section, _, tail = section.partition(".")
        rest = (tail,) if tail else ()
    if section == "param_groups" and len(rest) == 2 and isinstance(rest[0], int):
        group, name = rest[0], str(rest[1])
        if name == "params":
            if not isinstance(e, ObjectEntry):
                raise CorruptCheckpointError(f"{where}: {e.key!r} is a tensor, expected a list of names")
            layout.members[group] = e
        else:
            layout.groups.setdefault(group, {})[name] = e
        return
    if section not in ("state", "param_groups") or not rest:
        layout.extras[e.key] = e
        return
    if len(rest) >= 2 and str(rest[0]) in finder.fqns:  # nested: (fqn, name...)
        fqn, name = str(rest[0]), ".".join(map(str, rest[1:]))
    else:
        found = finder.split(".".join(map(str, rest)))
        if found is None:
            group_key = _int_head(rest) if section == "param_groups" else None
            if group_key is not None:
                _place(layout, ("param_groups", *group_key), e, finder, where)
                return
            raise CorruptCheckpointError(
                f"{where}: optimizer entry {e.key!r} names no parameter of the model section "
                f"{layout.model_key!r}; the model and optimizer state dicts do not belong together")
        fqn, name = found
    target = layout.states if section == "state" else layout.per_param
    target.setdefault(fqn, {})[name] = e


def _int_head(rest: KeyPath) -> tuple[int, str] | None:
    """``("0.lr",)`` -> ``(0, "lr")``: a nested param-group key saved without its flatten mapping."""
    head, _, tail = ".".join(map(str, rest)).partition(".")
    return (int(head), tail) if head.isdigit() and tail else None
