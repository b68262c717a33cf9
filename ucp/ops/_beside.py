"""An output directory built beside its destination and swapped in when complete.

``ucp convert`` writes a whole directory. Written in place, a failure (a full disk, a bad
parameter, a kill) would leave a half-written directory, and ``--overwrite`` would destroy the
old good output before the new one is known to fit. On local disk the new output is therefore
built in a sibling ``DST.partial-XXXX`` directory and renamed over ``DST`` only once complete;
the old directory is renamed aside first and deleted last, so files a hard-linked snapshot
shares are never written, only unlinked. Object stores have no directory rename: there the
output is written in place (each object a new one, never modified), and a failed build deletes
only a destination that did not exist before.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import Any, Mapping

from ucp.storage import Storage, fsync_dir

from ucp.core._errors import StorageError

__all__ = ["Beside"]

log = logging.getLogger("ucp")


class Beside:
    """Where to build the output for ``dst``; :meth:`publish` or :meth:`abandon` it at the end.

    Created by the one process that commits (rank 0); the other ranks build at :attr:`url`.
    """

    def __init__(self, dst: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        storage = Storage(dst, storage_options=storage_options)
        self._storage, self._local = storage, storage.is_local
        self.final = storage.root
        self._existed = bool(storage.list("")) or storage.exists("")
        self.url = f"{self.final}.partial-{uuid.uuid4().hex[:12]}" if self._local else dst

    def publish(self) -> None:
        """Puts the complete output in place of ``dst`` (local: two renames, made durable by
        syncing the parent directory, then the old output is deleted)."""
        if not self._local:
            return
        old = None
        try:
            if os.path.lexists(self.final):
                old = f"{self.final}.old-{uuid.uuid4().hex[:12]}"
                os.rename(self.final, old)
            os.rename(self.url, self.final)
            fsync_dir(os.path.dirname(os.path.abspath(self.final)))  # the renames survive a power cut
        except OSError as e:
            if old is not None and not os.path.lexists(self.final):
                os.rename(old, self.final)  # the old output back in place
            raise StorageError(f"could not move the finished output {self.url} to {self.final}: "
                               f"{e}; the new output is kept at {self.url}") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """Removes what a failed build wrote (best effort); an old output stays as it was."""
        try:
            if self._local:
                shutil.rmtree(self.url, ignore_errors=True)
            elif not self._existed:
                self._storage.delete("", recursive=True)
        except Exception as e:  # noqa: BLE001 - the build's own error is the one to report
            log.warning("ucp: could not remove the partial output at %s: %s", self.url, e)
