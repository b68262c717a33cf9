"""torch.distributed.checkpoint (DCP): ``.metadata`` + ``.distcp`` checkpoints as a conversion source.

- ``_meta``: the pickled ``.metadata``, read by a restricted unpickler into ucp's own dataclasses.
- ``_blobs``: the ``.distcp`` files' byte ranges (raw tensors, zstd, torch.save blobs).
- ``_layout``: which saved keys are model parameters, optimizer states, groups and buffers.
- ``_reader``, ``_engine``: the ``dcp`` engine plugin.
"""

from ._engine import ENGINE, DcpEngine

__all__ = ["ENGINE", "DcpEngine"]
