"""DeepSpeed MoE (``deepspeed.moe.layer.MoE``) checkpoints: local experts to global expert ids.

With expert parallelism of size ``E`` over ``dp`` data-parallel ranks and ``D = dp / E``, DeepSpeed
puts data-parallel rank ``r`` in expert-parallel rank ``r % E`` (expert-data-parallel rank ``r // E``),
or with ``use_data_before_expert_parallelism`` (recorded in ``ds_config``) in expert-parallel rank
``r // D`` (expert-data-parallel rank ``r % D``). Each rank holds ``n`` local experts, named
``...deepspeed_experts.<local id>...`` in its optimizer file; local expert ``l`` of expert-parallel
rank ``e`` is global expert ``e * n + l``. An expert param group is a ZeRO flat group partitioned
over the ``dp / E`` ranks of one expert-data-parallel group (its ``partition_count``), and the
model-dtype weights are in ``layer_<L>_expert_<global id>_mp_rank_XX_model_states.pt``, keyed by
global names.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from ucp.core._errors import CorruptCheckpointError

from ._files import TensorRef

__all__ = ["EXPERT_FILE", "global_expert_name", "local_expert_count", "expert_ranks", "expert_weights",
           "data_before_expert"]

#: ``layer_<L>_expert_<E>_mp_rank_<M>_model_states.pt`` (the old form has no ``layer_<L>_``).
EXPERT_FILE = re.compile(r"(?:layer_(\d+)_)?expert_(\d+)_mp_rank_(\d+)_model_states\.pt")
_EXPERT_ID = re.compile(r"(.*\.deepspeed_experts\.)(\d+)(\..*)")


def global_expert_name(local: str, ep_rank: int, local_count: int) -> str:
    """``local`` (a local expert's parameter name) under its global expert id."""
    m = _EXPERT_ID.fullmatch(local)
    if not m:
        return local
    return f"{m[1]}{ep_rank * local_count + int(m[2])}{m[3]}"


def local_expert_count(names: list[str], where: str) -> int:
    """How many experts each rank holds: the distinct local ids among one rank's expert parameters."""
    ids = {int(m[2]) for n in names if (m := _EXPERT_ID.fullmatch(n))}
    if ids != set(range(len(ids))):
        raise CorruptCheckpointError(f"{where}: local expert ids {sorted(ids)} are not 0..{len(ids) - 1}; the "
                                     "expert groups' parameter names are damaged")
    return len(ids)


def expert_ranks(dp: int, count: int, ep_rank: int, where: str, *, data_before_expert: bool = False) -> list[int]:
    """The data-parallel ranks that partition expert-parallel rank ``ep_rank``'s expert groups
    (``count`` of them: the expert-data-parallel size)."""
    if count <= 0 or dp % count:
        raise CorruptCheckpointError(f"{where}: an expert group partitioned over {count} ranks of {dp}; the "
                                     "partition counts are damaged")
    if data_before_expert:
        return [ep_rank * count + k for k in range(count)]
    return [ep_rank + dp // count * k for k in range(count)]


def data_before_expert(model: Mapping) -> bool:
    """Whether the run ordered data before expert parallelism (``ds_config`` of a model states file)."""
    cfg = model.get("ds_config")
    return isinstance(cfg, Mapping) and cfg.get("use_data_before_expert_parallelism") is True


def expert_weights(files: Mapping[tuple[int, int, int], str], mp: int,
                   load: Callable[[str], Any]) -> dict[str, TensorRef]:
    """Global expert parameter name -> its model-dtype tensor, from the expert files of mp rank ``mp``."""
    out: dict[str, TensorRef] = {}
    for (_, _, m), path in sorted(files.items()):
        if m != mp:
            continue
        tree = load(path)
        out.update({k: v for k, v in (tree.items() if isinstance(tree, Mapping) else ())
                    if isinstance(v, TensorRef)})
    return out
