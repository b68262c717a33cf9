"""The native checkpoint root: step directories, manifests, ``latest``, retention.

A step is committed exactly when ``step-NNNNNNNN/manifest.json`` exists; ``latest`` names the
newest committed step for people and tools, but readers trust only manifests.
"""

from __future__ import annotations

import logging

from ucp.storage import Storage

from ucp.core._errors import CheckpointNotFoundError, CorruptCheckpointError, UcpError
from ucp.native._meta import MAX_JSON_BYTES, Manifest, loads, parse_step_dir, step_dir

__all__ = ["MANIFEST", "LATEST", "committed_steps", "newest_step", "read_manifest",
           "write_latest", "apply_retention"]

MANIFEST = "manifest.json"
LATEST = "latest"
log = logging.getLogger("ucp")


def all_step_dirs(storage: Storage) -> list[int]:
    """Steps that have a directory, committed or not, ascending."""
    return sorted(s for s in (parse_step_dir(n) for n in storage.list("")) if s is not None)


def committed_steps(storage: Storage) -> list[int]:
    """Committed steps (those with a manifest), ascending."""
    steps = all_step_dirs(storage)
    present = storage.map(lambda s: storage.exists(f"{step_dir(s)}/{MANIFEST}"), steps)
    return [s for s, ok in zip(steps, present) if ok]


def newest_step(storage: Storage) -> int:
    """The newest committed step.

    Raises:
        CheckpointNotFoundError: nothing is committed under the root.
    """
    steps = committed_steps(storage)
    if not steps:
        partial = all_step_dirs(storage)
        hint = (f"; step directories without a manifest (never committed): {partial[-5:]}"
                if partial else "")
        raise CheckpointNotFoundError(f"no committed checkpoint under {storage.url}{hint}")
    return steps[-1]


def read_manifest(storage: Storage, step: int) -> Manifest:
    """The manifest of a committed step.

    Raises:
        CheckpointNotFoundError: the step is not committed (lists the committed ones).
        CorruptCheckpointError: the manifest is damaged.
    """
    rel = f"{step_dir(step)}/{MANIFEST}"
    try:
        raw = storage.read(rel, max_bytes=MAX_JSON_BYTES)
    except FileNotFoundError as e:
        steps = committed_steps(storage)
        raise CheckpointNotFoundError(f"step {step} is not committed under {storage.url} "
                                      f"(committed steps: {steps[-10:] or 'none'})") from e
    manifest = Manifest.from_dict(loads(raw, what=f"{storage.url}/{rel}"), what=f"{storage.url}/{rel}")
    if manifest.step != step:  # copied or linked in from another step: its records are not this step's
        raise CorruptCheckpointError(f"{storage.url}/{rel}: the manifest is of step {manifest.step}, "
                                     f"not of step {step} (copied or linked from another directory); "
                                     "restore the step's own manifest or use another step")
    return manifest


def _own_step(storage: Storage, step: int) -> bool:
    """Whether retention may delete ``step``: a real directory of this root holding its own
    manifest (logged when not)."""
    sd = step_dir(step)
    if storage.is_link(sd) or storage.is_link(f"{sd}/{MANIFEST}"):
        log.warning("ucp: retention leaves %s/%s alone: it is a symbolic link", storage.url, sd)
        return False
    try:
        read_manifest(storage, step)
    except UcpError as e:
        log.warning("ucp: retention leaves %s/%s alone: %s", storage.url, sd, e)
        return False
    return True


def write_latest(storage: Storage, step: int) -> None:
    storage.write(LATEST, f"{step_dir(step)}\n".encode())


def apply_retention(storage: Storage, *, keep: int, newest: int) -> list[int]:
    """Deletes committed steps older than the ``keep`` newest.

    Called by the coordinator only, after ``newest`` is committed. Steps without a manifest are
    left alone: another job sharing the root may be writing one. A step directory that is a
    link, or whose manifest is not its own, is never deleted (the link may lead out of the
    root). A step's manifest is deleted first, so a half-deleted step never looks committed.
    Returns the deleted steps.
    """
    committed = committed_steps(storage)
    candidates = [s for s in committed[:-keep] if s < newest] if keep < len(committed) else []
    doomed = [s for s in candidates if _own_step(storage, s)]
    for s in doomed:
        storage.delete(f"{step_dir(s)}/{MANIFEST}")
        storage.delete(step_dir(s), recursive=True)
    if doomed:
        log.info("ucp: retention (keep=%d) deleted steps %s", keep, sorted(doomed))
    return sorted(doomed)

