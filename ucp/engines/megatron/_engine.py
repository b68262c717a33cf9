"""The ``megatron`` engine: Megatron-core ``dist_checkpointing`` (torch_dist) directories.

A checkpoint directory holds ``metadata.json`` (``{"sharded_backend": "torch_dist", ...}``), DCP's
``.metadata`` and ``__<rank>_<n>.distcp`` files. A Megatron-LM save root holds
``latest_checkpointed_iteration.txt`` and one ``iter_NNNNNNN`` directory per save; the root resolves
to the newest (or to ``tag``: an iteration number or a directory name).
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from ucp.storage import Storage

from ucp.core import CheckpointNotFoundError, ConvertError
from ._reader import MegatronCheckpoint

__all__ = ["ENGINE", "MegatronEngine", "resolve"]

_CONFIG = "metadata.json"
_LATEST = "latest_checkpointed_iteration.txt"


def _iteration_dir(tag: str) -> str:
    """Megatron-LM's directory name for a tag (``100`` -> ``iter_0000100``; ``release`` as is)."""
    return f"iter_{int(tag):07d}" if tag.isdigit() else tag


def resolve(url: str, *, storage_options: Mapping[str, Any] | None = None,
            tag: str | None = None) -> tuple[Storage, list[str]] | None:
    """The checkpoint directory ``url`` names (itself, or a Megatron-LM root's save), and its listing;
    None when neither holds ``metadata.json``.

    Raises:
        CheckpointNotFoundError: a root names a save that is not there.
    """
    storage = Storage(url, storage_options=storage_options)
    names = storage.list("")
    if _CONFIG in names and tag is None:
        return storage, names
    if tag is None and _LATEST not in names:
        return None
    which = _iteration_dir(tag if tag is not None else storage.read(_LATEST).decode().strip())
    sub = storage.child(which)
    listing = sub.list("")
    if _CONFIG not in listing:
        raise CheckpointNotFoundError(f"{sub.url}: no {_CONFIG}; {_LATEST if tag is None else 'the tag'} "
                                      f"names save {which!r}, which is missing or incomplete "
                                      "(pass --step with another iteration)")
    return sub, listing


def detect(url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """A one-line description when ``url`` is a Megatron torch_dist checkpoint (or a root of them).

    Raises:
        ConvertError: a Megatron checkpoint in a format ucp does not read (another backend).
    """
    found = resolve(url, storage_options=storage_options)
    if found is None:
        return None
    storage, names = found
    try:
        config = json.loads(storage.read(_CONFIG))
    except ValueError as e:
        raise ConvertError(f"{storage.url}/{_CONFIG}: not JSON ({e}); a Megatron dist_checkpointing "
                           "directory's metadata.json names its backend") from e
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != "torch_dist":
        raise ConvertError(f"{storage.url}: a Megatron dist_checkpointing checkpoint with backend "
                           f"{backend!r}; ucp reads 'torch_dist' (Megatron's default): re-save with "
                           "--ckpt-format torch_dist")
    data = [n for n in names if n.endswith(".distcp")]
    if ".metadata" not in names:
        raise ConvertError(f"{storage.url}: Megatron torch_dist checkpoint without .metadata; the save "
                           "did not finish (it is written last): use an earlier iteration")
    where = "" if storage.url == url else f" {storage.url.rsplit('/', 1)[-1]}"
    return f"Megatron-core dist_checkpointing (torch_dist){where}: {len(data)} .distcp file(s)"


class MegatronEngine:
    """Detects and opens Megatron-core torch_dist checkpoints; the layout comes from the metadata,
    so no spec is taken (one that would be ignored is refused)."""

    name = "megatron"

    @property
    def reshard_target(self) -> Any:
        """``ucp reshard --engine megatron``: a torch_dist checkpoint Megatron loads (``_target``)."""
        from ._target import MegatronTarget

        return MegatronTarget()

    def detect(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        return detect(url, storage_options=storage_options)

    def open(self, url: str, *, spec: Any = None, storage_options: Mapping[str, Any] | None = None,
             tag: str | None = None) -> MegatronCheckpoint:
        if spec is not None:
            raise ConvertError(f"{url}: a Megatron torch_dist checkpoint records every tensor's global "
                               "shape and layer stacking, and converts to Megatron's own tp=1 names "
                               "without a spec; drop --spec")
        found = resolve(url, storage_options=storage_options, tag=tag)
        where = url if found is None else found[0].url
        return MegatronCheckpoint(where, storage_options=storage_options)


ENGINE = MegatronEngine()
