"""The resume hook: periodic asynchronous saves and resume onto any topology.

Example (the two lines a training loop needs)::

    ckpt = ucp.Checkpointer("s3://bucket/run", every=100, keep=3, topology="dp=4,tp=2")
    start = ckpt.resume(state)                   # state = {"model": m, "optim": o, "sched": s, "data": {...}}
    for step in range(start + 1, total + 1):
        train_step(...)
        ckpt.maybe_save(step, state)
    ckpt.close()
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Mapping

from ucp.native import _live
from ucp.core._coord import dist_rank_and_world
from ucp.core._errors import CheckpointNotFoundError, StateError
from ucp.native._layout import newest_step, read_manifest
from ucp.native._load import load
from ucp.native._save import SaveHandle, save
from ucp.core._topology import Topology
from ucp.storage import Storage

__all__ = ["Checkpointer"]

log = logging.getLogger("ucp")


class Checkpointer:
    """Saves a training state every ``every`` steps and resumes from the newest committed one.

    Called on every rank, with the same arguments. What is saved: the model and optimizer (all
    states and hyper-parameters, by parameter name), every other object with ``state_dict`` /
    ``load_state_dict`` (LR scheduler, data loader state), plain values (e.g. the data position),
    the step, and each rank's RNG states.

    Policies:
        * A save still in flight when the next is due: ``overlap="wait"`` (default) blocks until
          it is committed, then stages the new one; ``"skip"`` skips the new save. Either way at
          most two snapshots are in memory and no checkpoint is ever corrupted.
        * World size or topology changed on resume: model and optimizer are resharded on the fly
          (no universal copy is written); stateful objects and plain values come from rank 0 of
          the saved job, so keep the data position as the *global* number of samples consumed;
          RNG is re-derived from ``(seed, step, rank)``. Unchanged: every rank gets its own RNG.

    Args:
        url: checkpoint root (local path or fsspec URL).
        every: save when ``step % every == 0``.
        keep: keep only the ``keep`` newest committed steps.
        topology: this job's parallel layout (recorded, and compared on resume).
        overlap: ``"wait"`` or ``"skip"`` (above).
        seed: base seed of the RNG policy.
        storage_options: fsspec options.
        timeout: seconds ranks wait for each other while committing.
    """

    def __init__(self, url: str, *, every: int, keep: int | None = None,
                 topology: Topology | str | None = None, overlap: Literal["wait", "skip"] = "wait",
                 seed: int = 0, storage_options: Mapping[str, Any] | None = None,
                 timeout: float = 600.0) -> None:
        if not isinstance(every, int) or every < 1:
            raise StateError(f"every={every!r} must be a positive integer")
        if overlap not in ("wait", "skip"):
            raise StateError(f"overlap={overlap!r} must be 'wait' or 'skip'")
        self.url, self.every, self.keep, self.overlap, self.seed = url, every, keep, overlap, seed
        self.topology = Topology.parse(topology) if isinstance(topology, str) else topology
        self.storage_options, self.timeout = storage_options, timeout
        self._pending: SaveHandle | None = None
        #: What the last resume onto another topology read (``ucp.resharder.ReadStats``), else None.
        self.last_read: Any = None

    # -- saving --------------------------------------------------------------------------------
    def maybe_save(self, step: int, state: Mapping[str, Any]) -> SaveHandle | None:
        """Saves ``state`` as ``step`` when it is due; blocks at most for staging (and, with
        ``overlap="wait"``, for a previous save still in flight)."""
        if step % self.every:
            return None
        if self._pending is not None and not self._pending.done():
            if self.overlap == "skip":
                log.warning("ucp: save of step %d skipped: step %d is still being written",
                            step, self._pending.step)
                return None
            self._pending.wait()
        return self.save(step, state)

    def save(self, step: int, state: Mapping[str, Any]) -> SaveHandle:
        """Saves now (asynchronously). Errors of the previous save surface here."""
        if self._pending is not None:
            previous, self._pending = self._pending, None
            previous.wait()
        snapshot = _live.capture(state)
        snapshot["meta"] = {"step": step, "seed": self.seed, "world_size": dist_rank_and_world()[1],
                            "topology": None if self.topology is None else str(self.topology)}
        self._pending = save(snapshot, self.url, step=step, keep=self.keep, topology=self.topology,
                             storage_options=self.storage_options, timeout=self.timeout, overwrite=True)
        return self._pending

    def wait(self) -> None:
        """Blocks until the last save is committed (raises its error, if any)."""
        if self._pending is not None:
            self._pending.wait()

    def close(self) -> None:
        """Waits for the save in flight; the Checkpointer can still be used afterwards."""
        self.wait()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resuming ------------------------------------------------------------------------------
    def resume(self, state: dict[str, Any]) -> int:
        """Loads the newest committed checkpoint into ``state`` (live objects in place, plain
        values replaced) and returns its step; 0 when there is nothing to resume.

        Called on every rank. Reads only this rank's files when the topology is unchanged;
        otherwise reshards on the fly, reading from each tensor only the region this rank holds.
        """
        storage = Storage(self.url, storage_options=self.storage_options)
        try:
            step = newest_step(storage)
        except CheckpointNotFoundError:
            log.info("ucp: nothing to resume under %s; starting at step 0", self.url)
            return 0
        manifest = read_manifest(storage, step)
        rank, world = dist_rank_and_world()
        saved_topo = manifest.topology
        same = manifest.world_size == world and (self.topology is None or saved_topo is None
                                                 or saved_topo == self.topology)
        if same:
            template = _live.capture(state)
            saved = load(self.url, step=step, like=template, storage_options=self.storage_options)
            _live.restore_same(state, saved)
        else:
            self._resume_resharded(state, storage, manifest, rank)
        before = str(saved_topo) if saved_topo else f"world={manifest.world_size}"
        after = str(self.topology) if self.topology else f"world={world}"
        if rank == 0:
            log.info("resumed step %d: %s", step, before if same else f"{before} -> {after}")
        return step

    def _resume_resharded(self, state: dict[str, Any], storage: Storage, manifest: Any, rank: int) -> None:
        """The model and optimizer through the resharder, straight from the saving ranks' files
        (each rank reads only the regions it holds); other state from the saving rank 0."""
        from ucp.native._source import NativeCheckpoint
        from ucp.resharder import load_into

        source = NativeCheckpoint(storage, manifest, lazy=True)  # reads only the indexes it needs
        model_key, optim_key = _live.roles(state)
        if model_key is not None:
            optim = state[optim_key] if optim_key is not None else None
            self.last_read = load_into(state[model_key], optim, source)
        _live.restore_extra(state, source.read_subtree(0, "extra") or {})
        _live.reseed(self.seed, manifest.step, rank)
