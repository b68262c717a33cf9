"""torch.distributed.checkpoint (DCP): ``.metadata`` + ``.distcp`` checkpoints as a conversion source.

- ``_meta``: the pickled ``.metadata``, read by a restricted unpickler into ucp's own dataclasses.
- ``_blobs``: the ``.distcp`` files' byte ranges (raw tensors, zstd, torch.save blobs).
- ``_layout``: which saved keys are model parameters, optimizer states, groups and buffers.
- ``_reader``, ``_engine``: the ``dcp`` engine plugin.
- ``_files``: entries by key, for plugins with their own key layout (Megatron-core).
- ``_hf``: torchtitan Llama -> Hugging Face Llama names and rotary row order (``ucp export --map
  torchtitan-llama``; one of the bundled maps in ``ucp.engines.megatron.MAPS``).
"""

from ._engine import ENGINE, DcpEngine
from ._files import DcpFiles
from ._meta import DcpMetadata, ObjectEntry, TensorEntry

__all__ = ["ENGINE", "DcpEngine", "DcpFiles", "DcpMetadata", "ObjectEntry", "TensorEntry"]
