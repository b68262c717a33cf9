"""Commit coordination on ucp's own gloo process group (never the training group).

Messages are JSON bytes moved in uint8 tensors: no pickle crosses ranks. Every collective is
bounded by the group's timeout.
"""

from __future__ import annotations

import atexit
import datetime
import json
import threading
from typing import Any

import torch

from ucp.core._errors import CoordinationTimeoutError

__all__ = ["Coordinator", "get_coordinator", "dist_rank_and_world", "pack_json", "unpack_json"]

_GROUPS: dict[tuple[int, float], "Coordinator"] = {}
_LOCK = threading.Lock()


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def dist_rank_and_world() -> tuple[int, int]:
    """This process's (rank, world size); (0, 1) without torch.distributed."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


class Coordinator:
    """Collectives used to commit a checkpoint, on a dedicated gloo group.

    All ranks call each method in the same order; ucp calls them only from its save worker
    thread, one save at a time.
    """

    def __init__(self, group: Any, rank: int, world_size: int, timeout: float, store: Any = None) -> None:
        self.group, self.rank, self.world_size, self.timeout = group, rank, world_size, timeout
        self._store, self._calls = store, 0
        # Coordinators are created in the same order on every rank, so this tag is shared.
        self._tag = f"ucp-coord/{len(_GROUPS)}"

    def _arrive(self) -> str | None:
        """Marks this rank's arrival at the next collective in the job's key-value store."""
        self._calls += 1
        tag = f"{self._tag}/{self._calls}"
        try:
            self._store.set(f"{tag}/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - only used to name missing ranks on failure
            return None
        return tag

    def _missing(self, tag: str | None) -> str:
        if tag is None:
            return "unknown ranks"
        try:
            missing = [r for r in range(self.world_size) if not self._store.check([f"{tag}/{r}"])]
        except Exception:  # noqa: BLE001 - the store's host (rank 0) may be the one that died
            return "rank 0 (which hosts the job's store) or others"
        return f"rank(s) {missing}" if missing else "no rank missing (a network failure?)"

    def all_gather_json(self, obj: Any, *, what: str) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world_size == 1:
            return [json.loads(json.dumps(obj))]
        import torch.distributed as dist

        payload = pack_json(obj)
        tag = self._arrive() if self._store is not None else None
        try:
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([payload.numel()]), group=self.group)
            longest = max(int(s) for s in sizes)
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[:payload.numel()] = payload
            bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(bufs, padded, group=self.group)
        except RuntimeError as e:
            raise CoordinationTimeoutError(
                f"{what}: {self._missing(tag)} did not arrive within {self.timeout:.0f}s (died, "
                f"hung or stopped saving). Cause: {str(e).splitlines()[0][:300]}") from e
        return unpack_json(bufs, [int(n) for n in sizes])

    def broadcast_json(self, obj: Any, *, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        return self.all_gather_json(obj if self.rank == 0 else None, what=what)[0]


def pack_json(obj: Any) -> torch.Tensor:
    """``obj`` as JSON bytes in a uint8 tensor (what one rank sends)."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)


def unpack_json(bufs: list[torch.Tensor], sizes: list[int]) -> list[Any]:
    """The objects in gathered buffers (each padded to the longest; ``sizes`` their lengths)."""
    return [json.loads(bytes(b[:n].numpy())) for b, n in zip(bufs, sizes)]


def get_coordinator(timeout: float) -> Coordinator:
    """ucp's coordination group for the current default group, created on first use.

    Collective on first use (it creates a process group): every rank must call it, in the
    same order relative to other process-group creations.
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return Coordinator(None, 0, 1, timeout)
    key = (id(dist.distributed_c10d._get_default_group()), float(timeout))
    with _LOCK:
        coord = _GROUPS.get(key)
        if coord is None:
            try:
                group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
            except RuntimeError as e:  # a rank died (or never got here) before the group existed
                raise CoordinationTimeoutError(
                    f"creating ucp's coordination group: not every one of the {dist.get_world_size()} "
                    f"ranks joined within {timeout:.0f}s (one died, hung, or does not call ucp in the "
                    f"same order). Cause: {str(e).splitlines()[0][:300]}") from e
            coord = Coordinator(group, dist.get_rank(), dist.get_world_size(), timeout,
                                store=_default_store(dist))
            _GROUPS[key] = coord
        return coord


#: What else holds process groups and is dropped with them at exit (e.g. the resharder's cached
#: device meshes); registered by whoever creates such objects (see :func:`on_exit`).
_AT_EXIT: list[Any] = []


def on_exit(fn: Any) -> Any:
    """Registers ``fn`` to run when ucp's process groups are dropped at exit; returns ``fn``."""
    _AT_EXIT.append(fn)
    return fn


@atexit.register
def _drop_groups() -> None:
    """Releases process groups while the interpreter is still whole (registered after the save
    worker's drain, so it runs after it). A gloo group destroyed during interpreter finalisation
    can abort the process ("terminate called without an active exception": its worker threads
    take the GIL to free tensors, and a thread taking the GIL during finalisation is unwound
    through C++ code that cannot be): so ucp's coordination groups and cached device meshes
    are dropped here, and a garbage collection frees the groups that reference cycles still
    hold (FSDP2 modules and their meshes make such cycles) now rather than at finalisation."""
    import gc

    with _LOCK:
        _GROUPS.clear()
    for fn in _AT_EXIT:
        fn()
    gc.collect()


def _default_store(dist: Any) -> Any:
    """The job's c10d key-value store (used only to name ranks that failed to arrive)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API; naming ranks then degrades gracefully
        return None
