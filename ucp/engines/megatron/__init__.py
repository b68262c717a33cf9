"""Megatron-core ``dist_checkpointing`` (torch_dist) checkpoints as a conversion source.

- ``_layout``: which saved keys are model tensors (layers stacked), optimizer states, common state.
- ``_reader``: :class:`MegatronCheckpoint`, parameters under Megatron's tp=1 names.
- ``_engine``: the ``megatron`` engine plugin (detection, Megatron-LM save roots).
- ``_hf``: bundled maps to Hugging Face names and layouts (``ucp export --map megatron-llama``), and
  the same map read in reverse (a Hugging Face Llama under Megatron's names, for the target).
- ``_target``: ``ucp reshard --engine megatron``, a torch_dist checkpoint Megatron loads at any tp/pp.

Reads go through the DCP plugin's :class:`~ucp.engines.dcp.DcpFiles`: the files are DCP's.
"""

from ._engine import ENGINE, MegatronEngine
from ._hf import MAPS, HfView
from ._reader import MegatronCheckpoint

__all__ = ["ENGINE", "MegatronEngine", "MegatronCheckpoint", "MAPS", "HfView"]
