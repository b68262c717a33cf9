"""Which layers each stage of a DeepSpeed ``PipelineModule`` holds, computed as its constructor does.

A ``PipelineModule`` cuts its list of layer specs into ``num_stages`` contiguous runs, by its
``partition_method`` (DeepSpeed 0.19.8, ``runtime/pipe/module.py`` and ``runtime/utils.py``):

- ``uniform``: by number of layers. With ``n`` layers and ``p`` stages each stage gets ``n // p``
  layers and the first ``n % p`` stages one more; with ``n <= p`` stage ``s`` starts at
  ``min(s, n)`` (stages past the layers are empty).
- ``parameters`` (DeepSpeed's default): by the number of trainable elements each layer's freshly
  built module holds (``requires_grad`` parameters; a function holds none; every occurrence of a
  tied layer counts its module). The cut minimises the spread between the heaviest and the
  lightest stage (the linear partition problem, solved by dynamic programming); among equal
  spreads the later split point wins. ``n <= p`` falls back to ``uniform``.
- ``type:REGEX``: the same balanced cut over weights 1 (the layer's class name matches REGEX,
  ignoring case) and 0. The checkpoint records no class names, so ucp cannot compute it: the
  stage boundaries must be given instead.

The result is the list of stage boundaries: stage ``s`` holds layers ``[parts[s], parts[s+1])``.
This module imports neither torch nor DeepSpeed.
"""

from __future__ import annotations

from typing import Sequence

from ucp.core._errors import TopologyError

__all__ = ["parse_partition", "uniform_parts", "balanced_parts", "stage_parts"]

METHODS = ("parameters", "uniform")


def parse_partition(text: str) -> str | list[int]:
    """``parameters``, ``uniform`` (a method name, as DeepSpeed's ``partition_method``, any case), or
    explicit boundaries ``0,3,6`` (ascending, the first 0). Raises TopologyError otherwise."""
    value = str(text).strip()
    if value.lower() in METHODS:
        return value.lower()
    if value.lower().startswith("type:"):
        raise TopologyError(f"partition {value!r}: a DeepSpeed checkpoint records no layer class names, so ucp "
                            "cannot compute a 'type:' partition; pass the loading job's stage boundaries "
                            "instead, e.g. --partition 0,3,6 (its PipelineModule prints 'stage=S layers=N' "
                            "for each stage when it starts)")
    try:
        parts = [int(x) for x in value.split(",")]
    except ValueError:
        raise TopologyError(f"partition {value!r} is neither a method ({', '.join(METHODS)}) nor stage "
                            "boundaries such as 0,3,6") from None
    if len(parts) < 2 or parts[0] != 0 or any(b <= a for a, b in zip(parts, parts[1:])):
        raise TopologyError(f"partition {value!r}: stage boundaries start at 0 and strictly increase (stage s "
                            "holds layers parts[s] to parts[s+1]-1; every stage at least one layer)")
    return parts


def uniform_parts(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_uniform``: ``num_items // num_parts`` each, the first remainder one more."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    size, extra = divmod(num_items, num_parts)
    return [p * size + min(p, extra) for p in range(num_parts + 1)]


def balanced_parts(weights: Sequence[int], num_parts: int) -> list[int]:
    """DeepSpeed's ``partition_balanced``: contiguous runs minimising max(run) - min(run).

    ``best[i][j]`` is the smallest spread cutting the first ``i`` weights into ``j`` runs, with its
    heaviest and lightest run; an unreachable cell keeps an infinite spread (and, as in DeepSpeed,
    a tie with it still records the split, which a finite spread later replaces)."""
    n, m = len(weights), num_parts
    if n <= m:
        return uniform_parts(n, m)
    inf = float("inf")
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    heaviest = [[inf] * (m + 1) for _ in range(n + 1)]
    lightest = [[inf] * (m + 1) for _ in range(n + 1)]
    spread = [[inf] * (m + 1) for _ in range(n + 1)]
    split = [[0] * (m + 1) for _ in range(n + 1)]
    heaviest[0][0] = spread[0][0] = 0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                run = prefix[i] - prefix[k]
                hi, lo = max(heaviest[k][j - 1], run), min(lightest[k][j - 1], run)
                if spread[i][j] >= hi - lo:
                    spread[i][j], heaviest[i][j], lightest[i][j], split[i][j] = hi - lo, hi, lo, k
    parts = [n]
    for j in range(m, 0, -1):
        parts.append(split[parts[-1]][j])
    return parts[::-1]


def stage_parts(partition: str | list[int], counts: Sequence[int], pp: int) -> list[int]:
    """The stage boundaries of ``pp`` stages over layers with trainable element ``counts``.

    Raises:
        TopologyError: more stages than layers, boundaries that do not fit, or a stage left empty.
    """
    n = len(counts)
    if pp > n:
        raise TopologyError(f"pp={pp}: the PipelineModule has {n} layers, and each pipeline stage needs at least "
                            f"one; use pp <= {n}")
    if isinstance(partition, list):
        parts = list(partition)
        if len(parts) != pp + 1:
            raise TopologyError(f"partition {','.join(map(str, parts))} gives {len(parts) - 1} stages, the target "
                                f"has pp={pp}; give pp+1 boundaries")
        if parts[-1] != n:
            raise TopologyError(f"partition {','.join(map(str, parts))} ends at layer {parts[-1]}, but the "
                                f"PipelineModule has {n} layers (0 to {n - 1}); the last boundary must be {n} "
                                "(a layer without a file beyond them: see --extra-layer)")
    elif partition == "uniform":
        parts = uniform_parts(n, pp)
    else:
        parts = balanced_parts(counts, pp)
    empty = [s for s in range(pp) if parts[s + 1] <= parts[s]]
    if empty:
        raise TopologyError(f"partition {partition!r} of {n} layers over pp={pp} leaves pipeline stage {empty[0]} "
                            f"empty (boundaries {parts}); use fewer stages or other boundaries")
    return parts
