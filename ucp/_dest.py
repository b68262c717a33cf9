"""Where a command may write: never into its own source.

``ucp convert X X`` used to succeed and leave a universal checkpoint on top of X's step
directories, hiding them; a destination inside the source (or the source inside the destination)
mixes the two the same way. :func:`check_destination` refuses these before anything is read or
written.
"""

from __future__ import annotations

import os

from ._errors import CheckpointExistsError
from ._steps import display_url

__all__ = ["check_destination"]


def _location(url: str | os.PathLike[str]) -> tuple[str, str]:
    """(protocol, normalised path) of a local path or fsspec URL."""
    text = os.fspath(url)
    protocol, sep, rest = text.partition("://")
    if not sep or protocol == "file":
        return "file", os.path.realpath(rest if sep else text)
    return protocol, rest.rstrip("/")


def check_destination(src: object, dst: str | os.PathLike[str]) -> None:
    """Refuses a destination that is the source, lies inside it, or contains it.

    ``src`` may also be an opened source object (e.g. the DeepSpeed hook's snapshot, resharded
    into a staging folder of its own root): only a location is checked.

    Raises:
        CheckpointExistsError: naming both locations and the fix.
    """
    if not isinstance(src, (str, os.PathLike)):
        return
    (sp, s), (dp, d) = _location(src), _location(dst)
    if sp != dp:
        return
    if s == d:
        where = "is the source itself"
    elif d.startswith(s.rstrip("/") + "/"):
        where = "lies inside the source"
    elif s.startswith(d.rstrip("/") + "/"):
        where = "contains the source"
    else:
        return
    raise CheckpointExistsError(f"{display_url(os.fspath(dst))}: the destination {where} "
                                f"({display_url(os.fspath(src))}); writing there would mix the "
                                "output with the source's files: choose a destination outside it")
