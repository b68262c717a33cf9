"""The universal checkpoint's group metadata as typed records, checked when read.

The group's ``zarr.json`` carries one sealed attribute table (see :mod:`._checkpoint`): where the
checkpoint came from, the param groups, and one entry per parameter and buffer. A reader works on
:class:`UniversalMeta` and its :class:`ArrayEntry` records, never on the raw JSON, so every field
is checked once, here: paths stay below the root, shapes are non-negative integers, dtypes are
known, state names are plain, no two paths differ only in case.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

from ucp.core._errors import CorruptCheckpointError
from ucp.core._stfile import dtype_from_name

__all__ = ["ArrayEntry", "UniversalMeta"]

_SAFE_STATE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclasses.dataclass(frozen=True)
class ArrayEntry:
    """A parameter's entry (its states are arrays below ``path``) or a buffer's (one array).

    ``meta_crc32c`` is the CRC32C of each array's ``zarr.json`` (by state; a buffer's: one int),
    ``fingerprints`` the layout-independent fingerprint of each state's values (a buffer's under
    ``""``); either may be missing in checkpoints written by older versions or with ``--no-verify``.
    """

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: str
    states: tuple[str, ...] = ()
    frozen: bool = False
    group: int | None = None
    nbytes: int | None = None
    meta_crc32c: Mapping[str, int] = dataclasses.field(default_factory=dict)
    fingerprints: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, e: Any, *, param: bool, where: str) -> ArrayEntry:
        """One table entry, checked (``param``: a parameter with states; else a buffer).

        Raises:
            CorruptCheckpointError: a malformed entry (named).
        """
        ok = isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("shape"), list) \
            and all(type(n) is int and n >= 0 for n in e["shape"]) and isinstance(e.get("dtype"), str)
        if ok and param:
            ok = isinstance(e.get("states"), list) and all(
                isinstance(s, str) and _SAFE_STATE.fullmatch(s) for s in e["states"])
        if not ok:
            raise CorruptCheckpointError(f"{where}: malformed entry for {name[:200]!r}; the group "
                                         "metadata is damaged, convert the checkpoint again")
        try:
            dtype_from_name(e["dtype"])
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(f"{where}: {name[:200]!r}: {err}") from None
        crcs, prints = e.get("meta_crc32c"), e.get("fingerprints")
        if param:
            crcs = {k: v for k, v in crcs.items() if type(v) is int} if isinstance(crcs, dict) else {}
            prints = {k: v for k, v in prints.items() if isinstance(v, str)} if isinstance(prints, dict) else {}
        else:
            crcs = {"": crcs} if type(crcs) is int else {}
            prints = {"": e["fingerprint"]} if isinstance(e.get("fingerprint"), str) else {}
        group = e.get("group")
        return cls(name=name, path=e["path"], shape=tuple(e["shape"]), dtype=e["dtype"],
                   states=tuple(e.get("states") or ()), frozen=bool(e.get("frozen")),
                   group=group if type(group) is int else None,
                   nbytes=e.get("nbytes") if type(e.get("nbytes")) is int else None,
                   meta_crc32c=crcs, fingerprints=prints)

    def meta_crc(self, state: str | None) -> int | None:
        """The recorded CRC32C of a state's (None: the buffer's) ``zarr.json``, if any."""
        return self.meta_crc32c.get("" if state is None else state)

    def fingerprint(self, state: str | None) -> str | None:
        """The recorded fingerprint of a state's (None: the buffer's) values, as hex, if any."""
        return self.fingerprints.get("" if state is None else state)


def _table(table: Any, *, param: bool, where: str, check_path: Callable[[str], Any],
           folded: dict[str, str]) -> dict[str, ArrayEntry]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise CorruptCheckpointError(f"{where}: the parameter table is a {type(table).__name__}")
    out: dict[str, ArrayEntry] = {}
    for name, raw in table.items():
        e = ArrayEntry.from_dict(name, raw, param=param, where=where)
        check_path(e.path)  # raises UnsafeInputError for a path that leaves the root
        other = folded.setdefault(e.path.lower(), name)
        if other != name:  # on a case-insensitive filesystem both would read one directory
            raise CorruptCheckpointError(f"{where}: {other[:200]!r} and {name[:200]!r} are stored at "
                                         "paths that differ only in case; the checkpoint cannot hold "
                                         "both (convert it again with this ucp, which refuses such names)")
        out[name] = e
    return out


@dataclasses.dataclass(frozen=True)
class UniversalMeta:
    """The group attribute table of a complete universal checkpoint, typed.

    ``attrs`` keeps the table as read (for ``UniversalCheckpoint.metadata`` and fields a newer
    writer may add).
    """

    format_version: int
    step: int | None
    engine: str | None
    topology: str | None  # parsed when asked for (a reader that never needs it never fails on it)
    spec: str | None
    spec_constants: Mapping[str, int] | None
    param_groups: tuple[Mapping[str, Any], ...]
    aliases: Mapping[str, str]
    params: Mapping[str, ArrayEntry]
    buffers: Mapping[str, ArrayEntry]
    attrs: Mapping[str, Any]

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], *, where: str,
                   check_path: Callable[[str], Any]) -> UniversalMeta:
        """The table, every entry checked (``check_path`` refuses a path leaving the root).

        Raises:
            CorruptCheckpointError: a malformed table or entry (named).
            UnsafeInputError: a path that leaves the checkpoint root.
        """
        folded: dict[str, str] = {}
        params = _table(attrs.get("params"), param=True, where=where, check_path=check_path, folded=folded)
        buffers = _table(attrs.get("buffers"), param=False, where=where, check_path=check_path, folded=folded)
        source = attrs.get("source") if isinstance(attrs.get("source"), dict) else {}
        text = source.get("topology")
        groups = attrs.get("param_groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise CorruptCheckpointError(f"{where}: param_groups is not a list of objects; the group "
                                         "metadata is damaged, convert the checkpoint again")
        aliases = attrs.get("aliases") or {}
        if not isinstance(aliases, dict) or not all(isinstance(v, str) for v in aliases.values()):
            raise CorruptCheckpointError(f"{where}: aliases is not a table of names; the group metadata "
                                         "is damaged, convert the checkpoint again")
        step = attrs.get("step")
        return cls(format_version=int(attrs.get("format_version") or 0),
                   step=step if type(step) is int else None,
                   engine=source.get("engine") if isinstance(source.get("engine"), str) else None,
                   topology=text if isinstance(text, str) and text else None,
                   spec=attrs.get("spec") if isinstance(attrs.get("spec"), str) else None,
                   spec_constants=attrs.get("spec_constants") or None,
                   param_groups=tuple(groups), aliases=dict(aliases), params=params, buffers=buffers,
                   attrs=attrs)
