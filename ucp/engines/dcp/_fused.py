"""torchtitan's fused attention projection: optimizer states of ``wqkv`` for the saved ``wq``/``wk``/``wv``.

torchtitan (0.3) trains one fused parameter ``<p>.wqkv.weight`` of shape
``[kv_heads * (q_per_kv + 2) * head_dim, dim]``: per KV group, that group's query heads, then its
key head, then its value head. Its model state dict splits the fused tensor into the stock
``wq``/``wk``/``wv`` (a state-dict hook), so a checkpoint holds the split weights, while the
optimizer, which knows parameters, keys the moments by the fused name.

Adam's moments are elementwise, so the moments of ``wq``, ``wk`` and ``wv`` are the fused moments
cut exactly as torchtitan cuts the weight. That cut needs the head size, which nothing in the
checkpoint records (the rows of ``wk`` are ``kv_heads * head_dim``, and any factorisation fits):
the caller supplies it (a spec constant ``head_dim``).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import OrderedDict
from typing import Any, Callable

import torch

from ucp.core._errors import ConvertError, CorruptCheckpointError
from ._meta import TensorEntry

__all__ = ["FusedPart", "FusedCache", "fused_names", "unfuse", "split_part", "fuse_parts", "check_head_dim",
           "PARTS"]

PARTS = ("wq", "wk", "wv")
_WQ = re.compile(r"^(.*\.)?wq\.([^.]+)$")


@dataclasses.dataclass(frozen=True)
class FusedPart:
    """One part of a fused optimizer state: what ``wq``, ``wk`` or ``wv`` holds of it.

    Attributes:
        source: the fused state as saved (e.g. ``optimizer.state.<p>.wqkv.weight.exp_avg``).
        index: 0 (``wq``), 1 (``wk``) or 2 (``wv``).
        rows_q, rows_k: the rows of ``wq`` and of ``wk`` (``wv`` has as many as ``wk``).
    """

    source: TensorEntry
    index: int
    rows_q: int
    rows_k: int

    @property
    def key(self) -> str:
        return f"{self.source.key} ({PARTS[self.index]} part)"


def fused_names(model: dict[str, TensorEntry]) -> dict[str, tuple[str, str, str]]:
    """``<p>wqkv.<s>`` -> its parts' FQNs, for every ``wq``/``wk``/``wv`` triple of the model section
    whose fused name the model section does not hold itself."""
    out: dict[str, tuple[str, str, str]] = {}
    for fqn in model:
        m = _WQ.match(fqn)
        if m is None:
            continue
        prefix, suffix = m.group(1) or "", m.group(2)
        parts = tuple(f"{prefix}{p}.{suffix}" for p in PARTS)
        fused = f"{prefix}wqkv.{suffix}"
        if all(p in model for p in parts) and fused not in model:
            out[fused] = parts  # type: ignore[assignment]
    return out


def unfuse(states: dict[str, dict], per_param: dict[str, dict], fused: dict[str, tuple[str, str, str]],
           model: dict[str, TensorEntry], where: str) -> None:
    """Moves the fused parameters' optimizer entries onto their parts, in place.

    Tensor states shaped like the fused weight become :class:`FusedPart` s; the others (``step``)
    and the hyper-parameters are the same for every part.

    Raises:
        CorruptCheckpointError: a fused state's shape does not fit its parts.
    """
    for name, parts in fused.items():
        q, k, v = (model[p] for p in parts)
        tail = q.shape[1:]
        if k.shape != v.shape or k.shape[1:] != tail:
            raise CorruptCheckpointError(f"{where}: {parts[0]!r}, {parts[1]!r} and {parts[2]!r} have shapes "
                                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}; they are not "
                                         f"the parts of one fused {name!r}")
        shape = (q.shape[0] + 2 * k.shape[0], *tail)
        saved, moved = states.get(name, {}), {}
        for index, part in enumerate(parts):
            entries = {}
            for state, e in saved.items():
                if isinstance(e, TensorEntry) and e.shape == shape:
                    entries[state] = FusedPart(e, index, q.shape[0], k.shape[0])
                elif isinstance(e, TensorEntry) and e.shape:
                    raise CorruptCheckpointError(
                        f"{where}: {e.key!r} has shape {list(e.shape)}, but the saved {', '.join(parts)} "
                        f"make a fused {name!r} of shape {list(shape)}")
                else:
                    entries[state] = e
            if entries:
                moved[part] = entries
        _replace(states, name, moved)
        hyper = per_param.get(name)
        _replace(per_param, name, {part: dict(hyper) for part in parts} if hyper is not None else {})


def _replace(entries: dict[str, Any], name: str, parts: dict[str, Any]) -> None:
    """``entries`` with ``name`` replaced by ``parts`` where it stood, in place: the parts keep the
    fused parameter's place in the optimizer's order (a DeepSpeed ZeRO target lays parameters end
    to end in that order, as the model holds ``wq``/``wk``/``wv`` unfused)."""
    if name not in entries:
        entries.update(parts)
        return
    items = list(entries.items())
    entries.clear()
    for key, value in items:
        if key == name:
            entries.update(parts)
        else:
            entries[key] = value


def split_part(fused: torch.Tensor, part: FusedPart, head_dim: int) -> torch.Tensor:
    """``part``'s rows of the fused tensor, cut as torchtitan's ``FusedQKVLinear`` cuts its weight."""
    kv_heads, q_per_kv = part.rows_k // head_dim, part.rows_q // part.rows_k
    tail = tuple(fused.shape[1:])
    grouped = fused.reshape(kv_heads, q_per_kv + 2, head_dim, *tail)
    rows = grouped[:, :q_per_kv] if part.index == 0 else grouped[:, q_per_kv + part.index - 1]
    out = rows.reshape(-1, *tail)
    # a view (one KV group) would keep the whole fused tensor alive and share its memory
    return out.clone() if out.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() else out


def fuse_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The fused ``wqkv`` tensor of ``wq``/``wk``/``wv`` tensors (the inverse of :func:`split_part`):
    per KV group, its query heads' rows, then its key head's, then its value head's."""
    kv_heads, tail = k.shape[0] // head_dim, tuple(q.shape[1:])
    grouped = [q.reshape(kv_heads, -1, *tail), k.reshape(kv_heads, head_dim, *tail),
               v.reshape(kv_heads, head_dim, *tail)]
    return torch.cat(grouped, dim=1).reshape(-1, *tail)


class FusedCache:
    """Fused tensors being cut, so that ``wq``, ``wk`` and ``wv`` read their fused state once.

    An entry leaves once each of its three parts was taken, and at most ``capacity`` entries are
    kept (the oldest leaves first): a converter reading one parameter's states after another holds
    at most that many fused tensors. Thread-safe (a converter reads ahead in a thread).
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[torch.Tensor, set[int]]] = OrderedDict()

    def take(self, part: FusedPart, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The fused tensor of ``part`` (``load()`` reads it when it is not held)."""
        key = part.source.key
        with self._lock:
            held = self._entries.get(key)
        if held is None:
            held = (load(), set(range(len(PARTS))))
            with self._lock:
                self._entries[key] = held
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        with self._lock:
            held[1].discard(part.index)
            if not held[1]:
                self._entries.pop(key, None)
        return held[0]


def check_head_dim(head_dim: int | None, part: FusedPart, where: str) -> None:
    """The head size fits the fused tensor (or says how to give it).

    Raises:
        ConvertError: no head size, or one the rows do not divide into.
    """
    name = part.source.key
    if head_dim is None:
        raise ConvertError(
            f"{where}: {name!r} is torchtitan's fused attention projection (wq, wk and wv interleaved per "
            "KV group) and the checkpoint does not record the head size needed to split its optimizer "
            "states; give it as a spec constant, e.g. `ucp convert SRC DST --spec 'head_dim = 128'` "
            "(the model's dim / n_heads)")
    if head_dim <= 0 or part.rows_k % head_dim or part.rows_q % part.rows_k:
        raise ConvertError(f"{where}: head_dim = {head_dim} does not fit {name!r}: wq has {part.rows_q} rows "
                           f"and wk {part.rows_k}, which must be multiples of the head size (wq's of "
                           "wk's); check the spec's head_dim")
