"""Failpoints: named places where tests inject a crash or an I/O error into a real run.

Set ``UCP_FAILPOINT=name[:action]`` (comma-separated for several) and optionally
``UCP_FAILPOINT_RANK=r`` in a process's environment; ``action`` is ``kill`` (SIGKILL this
process, the default) or ``eio`` (raise an ``OSError(EIO)``). Unset, a failpoint costs one dict
lookup.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["failpoint"]


def failpoint(name: str, *, rank: int = 0) -> None:
    """Triggers the action configured for ``name`` in ``UCP_FAILPOINT``, if any, on ``rank``."""
    spec = os.environ.get("UCP_FAILPOINT")
    if not spec:
        return
    only = os.environ.get("UCP_FAILPOINT_RANK")
    if only is not None and only != "" and int(only) != rank:
        return
    for item in spec.split(","):
        point, _, action = item.partition(":")
        if point.strip() != name:
            continue
        if action in ("", "kill"):
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "eio":
            raise OSError(errno.EIO, f"injected I/O error at failpoint {name!r}")
