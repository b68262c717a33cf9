"""ucp's native format: what every rank saves, and its commit.

- ``_save``: the asynchronous per-rank save (snapshot, then write in the background) and the
  commit (rank 0 writes the manifest once every rank's files are written).
- ``_meta``: the manifest and rank index documents (frozen dataclasses <-> sealed JSON).
- ``_layout``: step directories, ``latest``, retention; ``_steps``: listing them (``ucp ls``).
- ``_claim``: the claim a saving job holds on a checkpoint root.
- ``_load``: a committed step loaded back bit for bit on the same topology.
- ``_source``: the native engine plugin and :class:`~ucp.native._source.NativeCheckpoint`, which
  reads any region of any tensor from the per-rank files (the resharder's source on resume).
- ``_target``: the native layout as a reshard target.
- ``_checkpointer`` / ``_live``: the training-loop hook (save every N steps; resume onto any
  topology through :func:`ucp.resharder.load_into`).
"""
