"""DeepSpeed resume hook: save a live DeepSpeed engine through ucp, resume on another dp size.

Saving: every ``every`` steps, ``engine.save_checkpoint`` writes DeepSpeed's native files to a
staging folder (DeepSpeed's own blocking save, the only way to read its ZeRO partitions), then a
background thread on every rank runs ``ucp.convert`` into ``URL/step-NNNNNNNN`` (a universal
checkpoint; committed once its metadata says complete) and deletes the staging copy. Training
continues while the conversion runs; a save that falls due while the previous conversion is still
running waits for it (policy "wait").

Resuming: the newest complete universal checkpoint is resharded into DeepSpeed's universal layout
(``ucp.reshard(..., engine="deepspeed")``) for the current dp size, loaded with
``engine.load_checkpoint`` under ``load_universal``, and the frozen parameters and buffers that
DeepSpeed's universal load skips are copied in (:func:`restore_deepspeed_extras`).

Every rank calls every method, in the same order (they run ucp's collectives on its own gloo
group, never on the training group). The staging folder must be visible to every rank (one
machine, or a shared filesystem).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from typing import Any

import torch

from ._coord import get_coordinator
from ._errors import CheckpointNotFoundError, SaveError, UcpError

__all__ = ["DeepSpeedCheckpointer", "load_deepspeed", "restore_deepspeed_extras"]

log = logging.getLogger("ucp")
_STEP_DIR = re.compile(r"step-(\d{8,})$")
_TIMEOUT = 600.0


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
    """Loads a DeepSpeed universal checkpoint (``ucp.reshard(..., engine="deepspeed")``) into a
    live engine of any dp size, frozen parameters and buffers included; returns its step.

    Every rank calls it (``engine.load_checkpoint`` is collective). The engine's config need not
    set ``"checkpoint": {"load_universal": true}``: it is switched on for this load only.
    """
    tag = tag or _read_tag(load_dir)
    config = engine._config  # noqa: SLF001 - DeepSpeed reads this flag only inside load_checkpoint
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        # ucp carries no DeepSpeed LR-scheduler state: the engine's scheduler stays as built.
        path, _client = engine.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise CheckpointNotFoundError(f"DeepSpeed found nothing to load under {load_dir} (tag {tag})")
    restore_deepspeed_extras(engine, load_dir, tag=tag)
    return int(engine.global_steps)


def _saved_topology(url: str, step: int) -> str:
    """The topology a universal checkpoint was saved from (for the one-line resume log)."""
    from ._universal import open_universal

    topo = open_universal(os.path.join(url, f"step-{step:08d}")).topology
    return "unknown topology" if topo is None else str(topo)


class DeepSpeedCheckpointer:
    """Periodic saves from a DeepSpeed engine into ucp's universal format, and elastic resume.

    Args:
        url: where universal checkpoints go (``URL/step-NNNNNNNN``; a local path).
        every: save when ``step % every == 0``.
        keep: how many complete checkpoints to keep (None: all).
        staging: a folder every rank sees, for DeepSpeed's native save and the resharded copy a
            resume loads (default: ``URL/.staging``).

    Example:
        >>> ckpt = ucp.DeepSpeedCheckpointer("ckpt/", every=10, keep=2)
        >>> start = ckpt.resume(engine)                # 0 on a fresh run
        >>> for step in range(start + 1, steps + 1):
        ...     ...; engine.backward(loss); engine.step()
        ...     ckpt.maybe_save(step, engine)
        >>> ckpt.close()
    """

    def __init__(self, url: str, *, every: int, keep: int | None = None, staging: str | None = None) -> None:
        if every < 1 or (keep is not None and keep < 1):
            raise ValueError(f"every={every}, keep={keep}: both must be >= 1 (keep may be None)")
        self.url, self.every, self.keep = url, every, keep
        self.staging = staging or os.path.join(url, ".staging")
        self._coord = get_coordinator(_TIMEOUT)  # collective on first use: create it up front
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def steps(self) -> list[int]:
        """Steps of the complete universal checkpoints under ``url``, oldest first."""
        from ._universal import open_universal

        found = []
        for entry in sorted(os.listdir(self.url)) if os.path.isdir(self.url) else []:
            m = _STEP_DIR.match(entry)
            if m:
                try:
                    open_universal(os.path.join(self.url, entry))
                except UcpError:
                    continue  # not committed (a conversion was interrupted)
                found.append(int(m.group(1)))
        return found

    def resume(self, engine: Any) -> int:
        """Loads the newest complete checkpoint into ``engine``; returns its step (0: none).

        Every rank calls it. The checkpoint is resharded for ``engine``'s dp size into
        ``staging`` (shared out over the ranks), loaded, and the resharded copy deleted.
        """
        from ._reshard import reshard

        steps = self.steps()
        if not steps:
            return 0
        step, stage = steps[-1], min(int(engine.zero_optimization_stage()), 2)
        topology = f"dp={engine.dp_world_size},zero={stage}"
        load_dir = os.path.join(self.staging, f"resume-{step:08d}")
        report = reshard(os.path.join(self.url, f"step-{step:08d}"), load_dir, topology=topology,
                         engine="deepspeed", overwrite=True, progress=False)
        loaded = load_deepspeed(engine, load_dir)
        self._coord.all_gather_json(None, what="loading the resharded DeepSpeed checkpoint")
        if self._coord.rank == 0:
            shutil.rmtree(load_dir, ignore_errors=True)
            log.info("resumed step %d: %s -> %s (%.1fs to reshard)", step, _saved_topology(self.url, step),
                     topology, report.seconds)
        return loaded

    def maybe_save(self, step: int, engine: Any) -> bool:
        """Saves when ``step % every == 0``; returns whether it did."""
        if step % self.every:
            return False
        self.save(step, engine)
        return True

    def save(self, step: int, engine: Any) -> None:
        """DeepSpeed's native save into ``staging`` (blocking), then the conversion to
        ``URL/step-NNNNNNNN`` in the background. Waits for the previous conversion first."""
        self.wait()
        tag = f"global_step{step}"
        engine.save_checkpoint(os.path.join(self.staging, "ds"), tag=tag,
                               client_state={"universal_checkpoint_info": {}})
        self._thread = threading.Thread(target=self._convert, args=(step, tag), name="ucp-ds-convert",
                                        daemon=True)
        self._thread.start()

    def _convert(self, step: int, tag: str) -> None:
        from ._convert import convert

        try:
            src = os.path.join(self.staging, "ds")
            convert(src, os.path.join(self.url, f"step-{step:08d}"), engine="deepspeed", tag=tag,
                    overwrite=True, progress=False)
            if self._coord.rank == 0:
                shutil.rmtree(os.path.join(src, tag), ignore_errors=True)
                self._retire()
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread by wait()
            self._error = e

    def _retire(self) -> None:
        if self.keep is None:
            return
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(os.path.join(self.url, f"step-{old:08d}"), ignore_errors=True)

    def wait(self) -> None:
        """Blocks until the conversion in flight (if any) is done.

        Raises:
            SaveError: it failed on this rank.
        """
        if self._thread is not None:
            self._thread.join(_TIMEOUT)
            if self._thread.is_alive():
                raise SaveError(f"converting the DeepSpeed save into {self.url} took over {_TIMEOUT:.0f}s")
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise SaveError(f"converting the DeepSpeed save into {self.url} failed on rank "
                            f"{self._coord.rank}: {err}") from err

    def close(self) -> None:
        """Waits for the last conversion; call it before the process exits."""
        self.wait()
