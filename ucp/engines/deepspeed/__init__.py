"""DeepSpeed: its checkpoints as a conversion source, its universal layout as a reshard target,
and a live engine saved through ucp and resumed on any data-parallel size.

- ``_files``, ``_layout``, ``_reader``, ``_engine``: DeepSpeed's own files (read with
  ``torch.load(weights_only=True)``), their ZeRO 0-3 / TP layout, and the ``deepspeed`` engine plugin.
- ``_snapshot``: ``DeepSpeedCheckpointer``'s saves (ucp native files of ZeRO partitions), read lazily.
- ``_live``: loading any source into a live ZeRO-1/2 engine's flat partitions.
- ``_hook``: ``DeepSpeedCheckpointer`` (public as ``ucp.deepspeed.Checkpointer``).
- ``_native``: ``ucp reshard --engine deepspeed`` (DeepSpeed's native ZeRO-1/2 files).
- ``_target``: ``ucp reshard --engine deepspeed-universal`` (DeepSpeed's universal layout).
"""

from ._engine import ENGINE, DeepSpeedEngine

__all__ = ["ENGINE", "DeepSpeedEngine"]
