"""Where a command may write: never into its own source.

``ucp convert X X`` used to succeed and leave a universal checkpoint on top of X's step
directories, hiding them; a destination inside the source (or the source inside the destination)
mixes the two the same way. :func:`check_destination` refuses these before anything is read or
written.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from ucp.core._errors import CheckpointExistsError
from ucp.core._text import display_url

__all__ = ["check_destination", "refuse_foreign"]


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


def refuse_foreign(dst: str, *, ours: Callable[[str], bool], what: str,
                   storage_options: Mapping[str, Any] | None = None) -> None:
    """Refuses a destination directory that holds entries the command would not write.

    Args:
        dst: the destination (it may not exist yet).
        ours: whether an entry name is one the command writes (or replaces with ``--overwrite``).
        what: what the command writes, for the message ("a ucp checkpoint").

    Raises:
        CheckpointExistsError: naming the first foreign entries and the fix.
    """
    from ucp.storage import Storage

    try:
        names = Storage(dst, storage_options=storage_options).list("")
    except FileNotFoundError:
        return
    foreign = sorted(n for n in names if not ours(n) and ".partial-" not in n)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CheckpointExistsError(f"{display_url(dst)} holds files that are not {what} ({shown}); "
                                    "write into a new or empty directory")
