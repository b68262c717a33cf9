"""The steps of a native checkpoint root (``ucp ls``), and the small text helpers every command
shares. Imports no torch: ``ucp ls`` and argument parsing stay fast.

Nothing here prints storage credentials: URLs are shown without their user-info part
(:func:`display_url`).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any, Mapping

from ucp.storage import Storage

from ucp.core._errors import CheckpointNotFoundError, UcpError
from ucp.core._text import display_url, human_bytes, parse_size
from ucp.native._layout import LATEST, all_step_dirs, committed_steps, read_manifest
from ucp.native._meta import parse_step_dir, step_dir

__all__ = ["SCHEMA_VERSION", "StepRow", "list_steps", "describe_other", "display_url", "human_bytes",
           "parse_size"]

#: Version of the JSON documents ``ucp inspect/verify/ls --json`` print (see docs/cli.md).
SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One step directory of a native checkpoint root."""

    step: int
    committed: bool
    latest: bool
    bytes: int | None
    files: int | None
    created: float | None  # commit time (committed) or newest file's mtime, seconds since epoch

    def to_dict(self, now: float) -> dict[str, Any]:
        return {"step": self.step, "path": step_dir(self.step), "committed": self.committed,
                "latest": self.latest, "bytes": self.bytes, "files": self.files,
                "created": None if self.created is None else _iso(self.created),
                "age_s": None if self.created is None else round(max(0.0, now - self.created), 3)}


def list_steps(url: str, *, storage_options: Mapping[str, Any] | None = None) -> list[StepRow]:
    """Every step directory under a native checkpoint root, oldest first.

    Raises:
        CheckpointNotFoundError: nothing at ``url``.
    """
    storage = Storage(url, storage_options=storage_options)
    if not storage.list("") and not storage.exists(""):
        raise CheckpointNotFoundError(f"{display_url(url)}: no such file or directory")
    steps = all_step_dirs(storage)
    committed = set(committed_steps(storage))
    latest = _latest(storage)
    return storage.map(lambda s: _step_row(storage, s, s in committed, s == latest), steps)


#: ``latest`` holds one directory name and a newline.
_MAX_LATEST = 4096


def _latest(storage: Storage) -> int | None:
    try:
        return parse_step_dir(storage.read(LATEST, max_bytes=_MAX_LATEST).decode("utf-8", "replace").strip())
    except (FileNotFoundError, OSError, UcpError):  # a hint only: a bad one is no step
        return None


def _step_row(storage: Storage, step: int, committed: bool, latest: bool) -> StepRow:
    try:
        found = storage.fs.find(storage.path(step_dir(step)), detail=True)
        infos = [i for i in found.values() if i.get("type") != "directory"]
        files, size = len(infos), sum(int(i.get("size") or 0) for i in infos)
        mtimes = [t for t in (_mtime(i) for i in infos) if t is not None]
    except (OSError, NotImplementedError):
        files = size = None
        mtimes = []
    created = max(mtimes) if mtimes else None
    if committed:
        try:
            created = read_manifest(storage, step).created
        except UcpError:
            pass
    return StepRow(step, committed, latest, size, files, created)


def _mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "created", "modified"):
        v = info.get(key)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, datetime.datetime):
            return v.timestamp()
    return None


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, tz=datetime.timezone.utc).isoformat(timespec="seconds")


def describe_other(url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """What a folder with no step directories holds, told by its file names alone (no torch):
    ``"a universal checkpoint"``, ``"a DeepSpeed checkpoint"``, ``"a torch.distributed.checkpoint
    (DCP) directory"``, ``"a step directory of a ucp checkpoint"``, a torchtitan or accelerate
    folder of DCP directories, or None."""
    storage = Storage(url, storage_options=storage_options)
    names = set(storage.list(""))
    if "zarr.json" in names:
        return "a universal checkpoint"
    if ".metadata" in names or any(n.endswith(".distcp") for n in names):
        return "a torch.distributed.checkpoint (DCP) directory"
    if "manifest.json" in names or any(n.startswith("rank-") for n in names):
        return "a step directory of a ucp checkpoint"
    if any(n.startswith("pytorch_model_fsdp_") for n in names):
        return "an accelerate save_state folder (DCP directories)"
    if any(n.startswith("step-") and n[5:].isdigit() for n in names):
        return "a torchtitan checkpoint folder (step-N DCP directories)"
    deepspeed_file = ("model_states.pt", "optim_states.pt")
    if any(n.startswith("global_step") or n.endswith(deepspeed_file) for n in names):
        return "a DeepSpeed checkpoint"
    if LATEST in names:
        try:
            tag = storage.read(LATEST).decode("utf-8", "replace").strip()
        except OSError:
            return None
        return "a DeepSpeed checkpoint" if tag and tag in names else None
    return None
