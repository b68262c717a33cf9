"""DeepSpeed resume hook: save a live DeepSpeed engine through ucp, resume on another dp size.

Saving: every ``every`` steps, :meth:`DeepSpeedCheckpointer.maybe_save` takes a snapshot of the
live engine on each rank (:func:`ucp.engines.deepspeed._snapshot.capture`: the rank's fp32 master
partitions and optimizer states, as DeepSpeed's ZeRO-1/2 optimizer holds them, plus on rank 0 the
module's state dict, and the counters, LR scheduler, RNG and client state) and hands it to
:func:`ucp.save`. That call returns once the tensors are copied into host memory; a background
worker writes ``URL/step-NNNNNNNN/rank-RRRRR.{safetensors,json}`` and commits the step with
``manifest.json`` once every rank has written. DeepSpeed's own ``save_checkpoint`` is not used and
nothing is pickled. A save that falls due while the previous one is still being written waits
for it (``overlap="wait"``) or is skipped on every rank (``overlap="skip"``).

Resuming: the newest committed step is opened as a conversion source
(:class:`ucp.engines.deepspeed._snapshot.DeepSpeedSnapshot`, metadata only) and loaded straight into the
engine (:func:`ucp.engines.deepspeed._live.load_engine`): the engine's own ZeRO layout for the current
number of ranks says which flat range of which parameters each rank holds, and only those ranges
of the saved partitions (fp32 masters, optimizer states) are read, into the engine's partitions,
with the module weights, frozen parameters and buffers every rank holds whole. Nothing is staged
and ``engine.load_checkpoint`` is not called. The engine's step counters and LR scheduler state
are then restored, and, when the dp size is unchanged, each rank's RNG states.

Every rank calls every method, in the same order (they run ucp's collectives on its own gloo
groups, never on the training group).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, Mapping

import torch

from ucp.core._coord import get_coordinator
from ucp.core._errors import CheckpointNotFoundError, StateError, UcpError
from ucp.native._save import SaveHandle

__all__ = ["DeepSpeedCheckpointer", "load_deepspeed", "restore_deepspeed_extras"]

log = logging.getLogger("ucp")


def restore_deepspeed_extras(engine: Any, load_dir: str, *, tag: str | None = None) -> list[str]:
    """Copies frozen parameters and buffers from a DeepSpeed checkpoint into ``engine.module``.

    DeepSpeed's universal load (``"load_universal": true``) restores only the parameters its
    optimizer owns; the rest keep the values the model was built with. Each rank calls this for
    itself after ``engine.load_checkpoint`` (no collective). ZeRO stages 0-2 (stage 3 partitions
    frozen parameters; not supported).

    Args:
        engine: a ``DeepSpeedEngine``.
        load_dir: the checkpoint folder given to ``engine.load_checkpoint``.
        tag: the tag loaded (default: ``latest_universal``, else ``latest``).

    Returns:
        The names restored.

    Raises:
        CheckpointNotFoundError: no model file for ``tag``.
    """
    tag = tag or _read_tag(load_dir)
    path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"no DeepSpeed model file {path}; pass the folder and tag that "
                                      "engine.load_checkpoint loaded")
    state = torch.load(path, map_location="cpu", weights_only=True)
    module, names = state["module"], list(state.get("frozen_param_shapes") or {}) + list(state.get("buffer_names") or [])
    live = dict(engine.module.named_parameters(remove_duplicate=False))
    live.update(engine.module.named_buffers(remove_duplicate=False))
    for name in names:
        if name not in live:
            raise UcpError(f"{path} holds {name!r} but the engine's module has no such parameter or "
                           "buffer; build the same model the checkpoint was saved from")
        with torch.no_grad():
            live[name].copy_(module[name].to(live[name].dtype))
    return names


def _read_tag(load_dir: str) -> str:
    for latest in ("latest_universal", "latest"):
        p = os.path.join(load_dir, latest)
        if os.path.isfile(p):
            with open(p) as f:
                return f.read().strip()
    raise CheckpointNotFoundError(f"{load_dir} has neither latest_universal nor latest; pass tag=")


def load_deepspeed(engine: Any, load_dir: str, *, tag: str | None = None) -> int:
    """Loads a DeepSpeed universal checkpoint (``ucp.reshard(..., engine="deepspeed-universal")``) into a
    live engine of any dp size, frozen parameters and buffers included; returns its step.

    Every rank calls it (``engine.load_checkpoint`` is collective). The engine's config need not
    set ``"checkpoint": {"load_universal": true}``: it is switched on for this load only.
    """
    tag = tag or _read_tag(load_dir)
    config = engine._config  # noqa: SLF001 - DeepSpeed reads this flag only inside load_checkpoint
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        # The universal layout holds no LR-scheduler state: the engine's scheduler stays as built
        # (DeepSpeedCheckpointer.resume restores it from its own snapshot).
        path, _client = engine.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise CheckpointNotFoundError(f"DeepSpeed found nothing to load under {load_dir} (tag {tag})")
    restore_deepspeed_extras(engine, load_dir, tag=tag)
    return int(engine.global_steps)


class DeepSpeedCheckpointer:
    """Periodic asynchronous saves of a DeepSpeed ZeRO-1/2 engine through ucp, and elastic resume.

    Args:
        url: the checkpoint root (``URL/step-NNNNNNNN``, ucp's native per-rank format; a local
            path or an fsspec URL).
        every: save when ``step % every == 0``.
        keep: how many committed steps to keep (None: all).
        staging: ignored (a resume loads the saved partitions straight into the engine and
            writes nothing); kept so that existing calls still work.
        overlap: a save still in flight when the next is due: ``"wait"`` (default) blocks until
            it is committed, then snapshots; ``"skip"`` skips the new save on every rank.
        timeout: seconds ranks wait for each other while committing a save.

    Example:
        >>> ckpt = ucp.DeepSpeedCheckpointer("ckpt/", every=10, keep=2)
        >>> start = ckpt.resume(engine)                # 0 on a fresh run
        >>> for step in range(start + 1, steps + 1):
        ...     ...; engine.backward(loss); engine.step()
        ...     ckpt.maybe_save(step, engine)          # returns after the snapshot copy
        >>> ckpt.close()
    """

    def __init__(self, url: str, *, every: int, keep: int | None = None, staging: str | None = None,
                 overlap: Literal["wait", "skip"] = "wait", timeout: float = 600.0) -> None:
        if not isinstance(every, int) or every < 1 or (keep is not None and keep < 1):
            raise StateError(f"every={every!r}, keep={keep!r}: both must be integers >= 1 (keep may be None)")
        if overlap not in ("wait", "skip"):
            raise StateError(f"overlap={overlap!r} must be 'wait' or 'skip'")
        self.url, self.every, self.keep, self.overlap, self.timeout = url, every, keep, overlap, timeout
        self.staging = staging
        #: Bytes the last :meth:`resume` read on this rank (``ucp.storage.ReadCounter``), else None.
        self.last_read: Any = None
        #: The client state of the step :meth:`resume` loaded (``{}`` before a resume).
        self.client_state: dict[str, Any] = {}
        # Collective on first use: created up front, on every rank. ucp.save's worker uses this
        # group from its thread; the "skip" decision needs a group of its own (another timeout
        # is another group), since two threads must not share one gloo group.
        self._coord = get_coordinator(timeout)
        self._decide = get_coordinator(timeout + 1.0) if overlap == "skip" else None
        self._pending: SaveHandle | None = None

    @property
    def pending(self) -> SaveHandle | None:
        """The handle of the last save started (None before the first, or after :meth:`wait`)."""
        return self._pending

    def steps(self) -> list[int]:
        """Committed steps under ``url``, oldest first."""
        from ucp.native._layout import committed_steps
        from ucp.storage import Storage

        try:
            return committed_steps(Storage(self.url))
        except FileNotFoundError:
            return []

    # -- saving --------------------------------------------------------------------------------
    def maybe_save(self, step: int, engine: Any, *, client_state: Mapping[str, Any] | None = None) -> bool:
        """Saves when ``step % every == 0``; returns whether a save was started.

        Blocks only for the snapshot copy (and, with ``overlap="wait"``, for a previous save still
        in flight); :attr:`pending` is the save's handle. Every rank calls it with the same step.
        """
        if step % self.every:
            return False
        if self._pending is not None and self._decide is not None:
            busy = self._decide.all_gather_json(not self._pending.done(),
                                                what=f"deciding whether to save step {step}")
            if any(busy):
                log.warning("ucp: save of step %d skipped: step %d is still being written", step,
                            self._pending.step)
                return False
        self.save(step, engine, client_state=client_state)
        return True

    def save(self, step: int, engine: Any, *, client_state: Mapping[str, Any] | None = None) -> SaveHandle:
        """Snapshots ``engine`` and saves it as ``step``, asynchronously; returns the handle.

        Waits for the previous save first (its error, if any, is raised here). ``client_state``:
        a dict of tensors and plain values saved with the step (:attr:`client_state` after a
        resume).

        Raises:
            SaveError: the previous save failed (names the rank).
            UcpError: an engine layout the hook does not cover (ZeRO-0/3, tp/pp, MoE).
        """
        from ._snapshot import capture
        from ucp.native._save import save

        self.wait()
        state = capture(engine, step=step, client_state=client_state)
        meta = state["meta"]
        self._pending = save(state, self.url, step=step, keep=self.keep, overwrite=True,
                             topology=f"dp={meta['dp_size']},zero={meta['stage']}", timeout=self.timeout)
        return self._pending

    def wait(self) -> None:
        """Blocks until the save in flight (if any) is committed.

        Raises:
            SaveError: it failed on some rank (named in the message); nothing was committed.
        """
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()

    def close(self) -> None:
        """Waits for the last save; call it before the process exits."""
        self.wait()

    # -- resuming ------------------------------------------------------------------------------
    def resume(self, engine: Any) -> int:
        """Loads the newest committed step into ``engine``; returns it (0: nothing to resume).

        Every rank calls it (no collective). The engine's own ZeRO layout for the current number
        of ranks says which flat range of which parameters this rank holds; only those ranges of
        the saved partitions (fp32 masters, optimizer states) are read, straight into the engine's
        partitions, plus the module weights and buffers every rank holds whole. Nothing is staged.
        """
        from ._live import load_engine
        from ._snapshot import DeepSpeedSnapshot
        from ucp.storage import read_counter

        self.wait()
        steps = self.steps()
        if not steps:
            return 0
        step, before = steps[-1], read_counter()
        source = DeepSpeedSnapshot(self.url, step)
        load_engine(engine, source)
        self._restore(engine, source)
        self.last_read = read_counter() - before
        if self._coord.rank == 0:
            target = f"dp={engine.dp_world_size},zero={min(int(engine.zero_optimization_stage()), 2)}"
            log.info("resumed step %d: %s -> %s (rank 0 read %.1f MiB)", step, source.topology, target,
                     self.last_read.bytes / 2**20)
        return step

    def _restore(self, engine: Any, source: Any) -> None:
        """What DeepSpeed's universal load leaves out: counters, LR scheduler, RNG, client state."""
        from ._snapshot import restore_rng

        meta = source.meta
        engine.global_steps, engine.global_samples = meta["global_steps"], meta["global_samples"]
        engine.skipped_steps = meta["skipped_steps"]
        sched, saved = getattr(engine, "lr_scheduler", None), source.saved(0, "lr_scheduler")
        if sched is not None and saved is not None:
            sched.load_state_dict(saved)
        same = source.dp_size == engine.dp_world_size
        mine = self._coord.rank if same else 0
        if same:  # another dp size: ranks hold other data, so the saved RNG streams do not carry over
            restore_rng(source.saved(mine, "rng"))
        self.client_state = dict(source.saved(mine, "client"))
