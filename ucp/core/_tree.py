"""Nested state <-> (JSON structure, flat tensor table).

A state is a nested structure of dicts (str or int keys), lists, tuples, tensors, numbers,
strings, bools and None. Tensors are replaced by ``{"@t": key}``; dicts whose keys are all
strings (none starting with ``@``) stay JSON objects, other dicts become ``{"@d": [[k, v], ...]}``,
tuples ``{"@tuple": [...]}`` and non-finite floats ``{"@f": "nan"}``, so the exact Python types
come back on load.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping

import torch

from ucp.core._errors import CorruptCheckpointError, StateError

__all__ = ["flatten", "unflatten", "KeyPath", "format_path", "jsonable"]

KeyPath = tuple[str | int, ...]
_MAX_DEPTH = 64


def format_path(path: KeyPath) -> str:
    return "state" + "".join(f"[{k!r}]" for k in path)


def flatten(state: Any) -> tuple[Any, dict[str, tuple[KeyPath, torch.Tensor]]]:
    """Splits ``state`` into a JSON-able structure and ``{key: (path, tensor)}``.

    Validates everything before any I/O.

    Raises:
        StateError: a value that is neither a tensor nor JSON-serialisable, naming its key path.
    """
    tensors: dict[str, tuple[KeyPath, torch.Tensor]] = {}

    def visit(obj: Any, path: KeyPath) -> Any:
        if len(path) > _MAX_DEPTH:
            raise StateError(f"{format_path(path[:4])}...: nesting deeper than {_MAX_DEPTH} levels "
                             "(is the state self-referencing?)")
        if isinstance(obj, torch.Tensor):
            key = "/".join(str(k) for k in path) or "@root"
            base, n = key, 1
            while key in tensors:
                key, n = f"{base}#{n}", n + 1
            tensors[key] = (path, obj)
            return {"@t": key}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {"@f": repr(float(obj))}
        if isinstance(obj, Mapping):
            for k in obj:
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise StateError(f"{format_path(path)}: key {k!r} of type {type(k).__name__} "
                                     "cannot be saved; use str or int keys")
            if all(isinstance(k, str) and not k.startswith("@") for k in obj):
                return {k: visit(v, path + (k,)) for k, v in obj.items()}
            return {"@d": [[k, visit(v, path + (k,))] for k, v in obj.items()]}
        if isinstance(obj, list):
            return [visit(v, path + (i,)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"@tuple": [visit(v, path + (i,)) for i, v in enumerate(obj)]}
        raise StateError(f"{format_path(path)}: a value of type {type(obj).__module__}."
                         f"{type(obj).__qualname__} cannot be saved; ucp saves tensors, numbers, "
                         "strings, bools, None, lists, tuples and dicts (call .state_dict() on "
                         "modules, optimizers and schedulers, or convert the value)")

    return visit(state, ()), tensors


def unflatten(tree: Any, tensor_for: Callable[[str], Any]) -> Any:
    """Inverse of :func:`flatten`; ``tensor_for(key)`` supplies each tensor.

    Raises:
        CorruptCheckpointError: the structure is not one :func:`flatten` produces.
    """

    def visit(obj: Any, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise CorruptCheckpointError(f"saved state nests deeper than {_MAX_DEPTH} levels")
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, list):
            return [visit(v, depth + 1) for v in obj]
        if isinstance(obj, dict):
            if len(obj) == 1:
                (tag, value), = obj.items()
                if tag == "@t" and isinstance(value, str):
                    return tensor_for(value)
                if tag == "@tuple" and isinstance(value, list):
                    return tuple(visit(v, depth + 1) for v in value)
                if tag == "@f" and value in ("nan", "inf", "-inf"):
                    return float(value)
                if tag == "@d" and isinstance(value, list):
                    if not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], (str, int))
                               for p in value):
                        raise CorruptCheckpointError("saved state: malformed '@d' entry")
                    return {k: visit(v, depth + 1) for k, v in value}
            if any(isinstance(k, str) and k.startswith("@") for k in obj):
                raise CorruptCheckpointError(f"saved state: unknown tag in {sorted(obj)[:3]}")
            return {k: visit(v, depth + 1) for k, v in obj.items()}
        raise CorruptCheckpointError(f"saved state: unexpected JSON value {obj!r:.60}")

    return visit(tree, 0)


def jsonable(obj: Any) -> Any:
    """Param-group hyper-parameters as JSON (tuples become lists; tensors become numbers)."""
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    json.dumps(obj, allow_nan=True)
    return obj
