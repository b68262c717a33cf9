"""Load planning and slicing: a universal checkpoint onto any DP / TP / PP / ZeRO topology.

A :class:`RankPlan` (pure metadata, :func:`plan_rank`) lists the regions of each universal array
a target rank needs and where they go; :func:`read_plan` reads them, chunk by chunk and in
parallel, reporting read amplification; :func:`build_state` lays the result out as ucp's own
state dict. :func:`load_rank_state` does all three for one rank; :func:`load_into` loads live
torch modules (plain, DTensor TP, FSDP2). docs/resharding.md describes the layouts.
"""

from ._api import load_rank_state
from ._fingerprints import check_recorded
from ._plan import (
    Copy,
    FlatSegment,
    GroupPlan,
    HeldParam,
    LocalTensor,
    RankPlan,
    Read,
    param_layouts,
    plan_rank,
    plan_ranks,
)
from ._read import LoadedRank, ReadStats, chunk_blocks, estimate_reads, read_plan
from ._source import ArrayInfo, ArraySource, open_array_source
from ._state import build_state
from ._targets import ReshardReport, get_target, register_target
from ._torch import load_into
from ._zero import GroupPartition, flat_boxes, group_partition, param_partition

__all__ = [
    "load_rank_state", "load_into",
    "plan_rank", "plan_ranks", "param_layouts", "read_plan", "build_state", "estimate_reads",
    "RankPlan", "Read", "Copy", "LocalTensor", "HeldParam", "GroupPlan", "FlatSegment",
    "LoadedRank", "ReadStats", "ReshardReport", "ArraySource", "ArrayInfo", "open_array_source",
    "register_target", "get_target", "chunk_blocks", "check_recorded",
    "flat_boxes", "group_partition", "param_partition", "GroupPartition",
]
