"""The universal checkpoint: one zarr group, one array per parameter state, laid out for any
topology.

- ``_checkpoint``: the writer (:class:`UniversalWriter`, what ``ucp convert`` builds) and the
  reader (:class:`UniversalCheckpoint`, ``ucp.open``), with the group metadata.
- ``_meta``: the group metadata as typed records (:class:`UniversalMeta`, one :class:`ArrayEntry`
  per parameter and buffer), every field checked once when the checkpoint is opened.
- ``_shard``: how an array's chunks lie in files (sharded layouts) and reading them by chunk.
- ``_source``: :class:`UniversalSource`, the universal checkpoint as the resharder reads it (only
  the chunks a region needs).
- ``_zarr``: the zarr store over :class:`ucp.storage.Storage` (for arrays ucp did not lay out).
"""

from ucp.universal._checkpoint import UniversalCheckpoint, UniversalWriter, open_universal
from ucp.universal._meta import ArrayEntry, UniversalMeta
from ucp.universal._source import UniversalSource, is_universal

__all__ = ["UniversalCheckpoint", "UniversalWriter", "open_universal", "UniversalSource", "is_universal",
           "UniversalMeta", "ArrayEntry"]
