"""Opening any checkpoint ucp reads, and describing it: ``ucp inspect`` and ``ucp ls``.

:func:`open_checkpoint` gives one read interface over every format: a universal checkpoint, any
engine plugin's source (ucp native, DCP, DeepSpeed, third-party), and plain safetensors (one file,
or a Hugging Face directory with ``model.safetensors.index.json``). :func:`inspect_checkpoint`
describes one without reading tensor data; :func:`list_steps` lists the steps of a native root.
``ucp verify`` (:mod:`ucp.ops._verify`) and ``ucp export`` (:mod:`ucp.ops._export`) build on the same
opener.

Nothing here prints or returns storage credentials: URLs are shown without their user-info part
(:func:`display_url`) and ``storage_options`` never appear in a report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Mapping

import torch

from ucp.storage import Storage

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError, UcpError
from ucp.native._layout import MANIFEST, committed_steps, read_manifest
from ucp.native._meta import MAX_JSON_BYTES, parse_step_dir
from ucp.native._steps import SCHEMA_VERSION, StepRow, display_url, human_bytes, list_steps, parse_size
from ucp.core._stfile import dtype_name
from ucp.core._topology import Topology
from ucp.core._params import ParamInfo, Region
from ucp.engines._open import spec_of
from ucp.engines.hf._files import INDEX, SafetensorsFiles

__all__ = ["SCHEMA_VERSION", "Opened", "TensorRow", "StepRow", "Report", "open_checkpoint",
           "detect_format", "inspect_checkpoint", "list_steps", "human_bytes", "parse_size",
           "display_url"]



# -- one read interface over every format -------------------------------------------------------

class Opened:
    """A checkpoint opened for reading, whatever its format.

    Attributes:
        format: ``universal``, ``safetensors``, or the engine plugin's name (``ucp``, ``dcp``,
            ``deepspeed``, ...).
        engine: the training engine that wrote it (for a universal checkpoint: its source's).
        url, step, topology, description: where, which step, the saving topology, and a line
            saying what was found.
        source: the underlying object (a ``UniversalCheckpoint``, an engine's source, or None).
        spec: the spec in use (given, or stored in the checkpoint), or None.
        spec_label: where it came from, for people (its file or bundled name, or "stored in the
            checkpoint").
    """

    def __init__(self, *, format: str, url: str, engine: str | None, step: int | None,
                 topology: Topology | None, description: str, source: Any, spec: Any = None,
                 spec_label: str | None = None) -> None:
        self.format, self.url, self.engine, self.step = format, url, engine, step
        self.topology, self.description, self.source, self.spec = topology, description, source, spec
        self.spec_label = spec_label if spec is not None else None
        self._buffers: dict[str, torch.Tensor] | None = None
        self.table = source.metadata if format == "universal" else {}  # one copy, not per call

    def names(self) -> list[str]:
        return list(self.source.names())

    def info(self, name: str) -> ParamInfo:
        return self.source.info(name)

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        return self.source.read(name, state, region)

    def buffer_names(self) -> list[str]:
        if self.format in ("universal", "safetensors"):
            return list(self.source.buffer_names())
        return list(self._engine_buffers())

    def buffer_info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if self.format in ("universal", "safetensors"):
            from ucp.core._stfile import dtype_from_name

            entry = (self.table.get("buffers") or {})[name]
            return tuple(entry["shape"]), dtype_from_name(entry["dtype"])
        t = self._engine_buffers()[name]
        return tuple(t.shape), t.dtype

    def read_buffer(self, name: str) -> torch.Tensor:
        if self.format in ("universal", "safetensors"):
            return self.source.read_buffer(name)
        return self._engine_buffers()[name]

    def param_groups(self) -> list[dict[str, Any]]:
        groups = self.source.param_groups
        return list(groups() if callable(groups) else groups)

    def _engine_buffers(self) -> dict[str, torch.Tensor]:
        if self._buffers is None:  # engines hand buffers over at once; they are small
            self._buffers = dict(self.source.buffers())
        return self._buffers


def detect_format(url: str, *, engine: str = "auto",
                  storage_options: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """``(format, what was found)`` for ``url``: ``universal``, ``safetensors`` or an engine name.

    ``engine`` other than ``auto`` forces the format (``universal``, ``safetensors``, or an
    engine plugin's name).

    Raises:
        CheckpointNotFoundError: nothing at ``url``.
        ConvertError: something there, but no format recognises it.
    """
    if engine == "hf":  # the Hugging Face engine reads plain safetensors
        engine = "safetensors"
    if engine != "auto":
        return engine, {"universal": "ucp universal checkpoint",
                        "safetensors": "safetensors"}.get(engine, f"{engine} checkpoint")
    if url.rstrip("/").endswith(".safetensors"):
        return "safetensors", "a safetensors file"
    storage = Storage(url, storage_options=storage_options)
    listing = storage.list("")
    if not listing and not storage.exists(""):
        raise CheckpointNotFoundError(f"{display_url(url)}: no such file or directory")
    if "zarr.json" in listing:
        return "universal", "ucp universal checkpoint"
    from ucp.engines._registry import detect_engine

    try:
        eng, found = detect_engine(url, storage_options=storage_options)
        return ("safetensors" if eng.name == "hf" else eng.name), found
    except ConvertError as e:
        base = url.rstrip("/").rsplit("/", 1)[-1]
        if parse_step_dir(base) is not None and any(n.startswith("rank-") for n in listing):
            return "ucp", "ucp native step directory without manifest.json (never committed)"
        if INDEX in listing or any(n.endswith(".safetensors") for n in listing):
            return "safetensors", "a directory of safetensors files"
        closest = getattr(e, "closest", None)  # the engine that came nearest says why it refused
        why = f"; closest: {closest}" if closest else ""
        raise ConvertError(f"{display_url(url)}: not a checkpoint ucp recognises (universal, ucp "
                           f"native, DCP, DeepSpeed, safetensors){why}; pass --engine NAME, or check "
                           "the path") from None


def open_checkpoint(url: str, *, engine: str = "auto", spec: Any = None, tag: str | None = None,
                    storage_options: Mapping[str, Any] | None = None) -> Opened:
    """Opens ``url`` for reading, whatever its format (see :class:`Opened`).

    Args:
        url: local path or fsspec URL.
        engine: ``auto``, or force a format: ``universal``, ``safetensors``, an engine name.
        spec: a UCL spec (Spec, bundled name, path or text); default: the one stored with a
            universal checkpoint.
        tag: step or tag of an engine checkpoint (default: the newest).
        storage_options: fsspec options (credentials, endpoint); never shown.

    Raises:
        CheckpointNotFoundError, ConvertError, CorruptCheckpointError: as the format's reader.
    """
    fmt, found = detect_format(url, engine=engine, storage_options=storage_options)
    spec_obj = spec_of(spec)
    label = None if spec_obj is None else (spec if isinstance(spec, str) and "\n" not in spec
                                           else spec_obj.source)
    stored = "stored in the checkpoint"
    if fmt == "universal":
        from ucp.universal._checkpoint import open_universal

        ckpt = open_universal(url, storage_options=storage_options)
        if spec_obj is None and ckpt.spec:
            from ucp.grammar import load_spec

            spec_obj = load_spec(ckpt.spec, constants=ckpt.metadata.get("spec_constants") or None)
            label = stored
        return Opened(format="universal", url=url, engine=ckpt.engine, step=ckpt.step,
                      topology=ckpt.topology, description=found, source=ckpt, spec=spec_obj,
                      spec_label=label)
    if fmt == "safetensors":
        files = SafetensorsFiles(url, storage_options=storage_options)
        return Opened(format="safetensors", url=url, engine=None, step=None, topology=None,
                      description=f"{found}: {len(files.files)} file(s)", source=files,
                      spec=spec_obj, spec_label=label)
    if fmt == "ucp" and spec_obj is None:
        spec_obj = _manifest_spec(url, tag, storage_options)
        label = stored
    from ucp.engines._open import open_source

    source, found = open_source(url, engine=fmt, spec=spec_obj, tag=tag,
                                storage_options=storage_options)
    found = found.removeprefix(f"{source.engine}: ")
    return Opened(format=source.engine, url=url, engine=source.engine, step=source.step,
                  topology=source.topology, description=found, source=source, spec=spec_obj,
                  spec_label=label)


def _manifest_spec(url: str, tag: str | None, storage_options: Mapping[str, Any] | None) -> Any:
    """The spec a native step recorded in its manifest (``ucp.save(spec=...)``), or None."""
    from ucp.native._source import _resolve_root

    try:
        root, step = _resolve_root(url, storage_options, tag)
        text = read_manifest(root, step).spec
    except UcpError:
        return None  # opening the checkpoint says what is wrong
    return None if not text else spec_of(text)


# -- inspect -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorRow:
    """One line of the parameter (or buffer) table."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    states: tuple[str, ...]
    bytes: int
    frozen: bool = False
    group: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "states": list(self.states), "bytes": self.bytes, "frozen": self.frozen,
                "group": self.group}


@dataclasses.dataclass(frozen=True)
class Report:
    """What ``ucp inspect`` shows (see docs/cli.md for the JSON schema)."""

    url: str
    format: str
    description: str
    engine: str | None
    step: int | None
    topology: Topology | None
    world_size: int | None
    commit: str  # committed | uncommitted | incomplete | none
    params: tuple[TensorRow, ...] = ()
    buffers: tuple[TensorRow, ...] = ()
    param_groups: tuple[dict[str, Any], ...] = ()
    bytes_exact: bool = True
    spec: str | None = None
    files: int | None = None
    size_on_disk: int | None = None
    steps: tuple[StepRow, ...] | None = None
    notes: tuple[str, ...] = ()

    def totals(self) -> dict[str, int]:
        return {"params": len(self.params),
                "elements": sum(math.prod(p.shape) for p in self.params),
                "bytes": sum(p.bytes for p in self.params),
                "buffers": len(self.buffers), "buffer_bytes": sum(b.bytes for b in self.buffers),
                "frozen": sum(p.frozen for p in self.params)}

    def to_dict(self) -> dict[str, Any]:
        now = time.time()
        return {"schema": "ucp.inspect", "schema_version": SCHEMA_VERSION,
                "url": display_url(self.url), "format": self.format,
                "description": self.description, "engine": self.engine, "step": self.step,
                "topology": None if self.topology is None else self.topology.to_dict(),
                "world_size": self.world_size, "commit": self.commit, "spec": self.spec,
                "files": self.files, "size_on_disk": self.size_on_disk,
                "bytes_exact": self.bytes_exact, "totals": self.totals(),
                "params": [p.to_dict() for p in self.params],
                "buffers": [b.to_dict() for b in self.buffers],
                "param_groups": [dict(g) for g in self.param_groups],
                "steps": None if self.steps is None else [s.to_dict(now) for s in self.steps],
                "notes": list(self.notes)}


def inspect_checkpoint(url: str, *, engine: str = "auto", spec: Any = None, tag: str | None = None,
                       storage_options: Mapping[str, Any] | None = None) -> Report:
    """Describes the checkpoint at ``url`` from its metadata (no parameter data is read; an
    engine checkpoint's buffers, which are small, are).

    Args: as :func:`open_checkpoint`.

    Returns:
        A :class:`Report`; ``report.to_dict()`` is the ``ucp inspect --json`` document.

    Raises:
        CheckpointNotFoundError, ConvertError, CorruptCheckpointError: unreadable or unknown.
    """
    fmt, found = detect_format(url, engine=engine, storage_options=storage_options)
    if fmt == "universal":
        return _inspect_universal(url, found, spec, storage_options)
    if fmt == "ucp":
        uncommitted = _native_uncommitted(url, found, storage_options)
        if uncommitted is not None:
            return uncommitted
    opened = open_checkpoint(url, engine=fmt, spec=spec, tag=tag, storage_options=storage_options)
    return _report_from(opened, storage_options)


def _inspect_universal(url: str, found: str, spec: Any,
                       storage_options: Mapping[str, Any] | None) -> Report:
    storage = Storage(url, storage_options=storage_options)
    raw = storage.read("zarr.json", max_bytes=MAX_JSON_BYTES)  # its own error names the bound
    try:
        attrs = json.loads(raw)["attributes"]["ucp"]
        complete = attrs.get("complete") is True
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{display_url(url)}/zarr.json: not the group metadata of a "
                                     "ucp universal checkpoint") from e
    if not complete:
        return Report(url=url, format="universal", description=found, engine=None, step=None,
                      topology=None, world_size=None, commit="incomplete",
                      notes=("the conversion did not finish (no parameter table yet); run "
                             "`ucp convert` again",))
    return _report_from(open_checkpoint(url, engine="universal", spec=spec,
                                        storage_options=storage_options), storage_options)


def _native_uncommitted(url: str, found: str,
                        storage_options: Mapping[str, Any] | None) -> Report | None:
    """A report for a native root (or step directory) with nothing committed, else None."""
    storage = Storage(url, storage_options=storage_options)
    base = url.rstrip("/").rsplit("/", 1)[-1]
    if parse_step_dir(base) is not None and not storage.exists(MANIFEST):
        return Report(url=url, format="ucp", description=found, engine="ucp",
                      step=parse_step_dir(base), topology=None, world_size=None,
                      commit="uncommitted", notes=("this step has no manifest.json: it was never "
                                                   "committed and is not read by ucp",))
    if parse_step_dir(base) is not None or committed_steps(storage):
        return None
    steps = list_steps(url, storage_options=storage_options)
    return Report(url=url, format="ucp", description=found, engine="ucp", step=None,
                  topology=None, world_size=None, commit="uncommitted", steps=tuple(steps),
                  notes=("no committed step under this root",))


def _report_from(opened: Opened, storage_options: Mapping[str, Any] | None) -> Report:
    exact = opened.format in ("universal", "safetensors")
    notes = [] if exact else ["bytes are estimated: param at the model dtype, other states 4 "
                              "bytes per element"]
    facts = _stored(opened, storage_options, notes)
    world = facts.get("world")
    if opened.topology is not None and world is None and opened.format != "universal":
        world = opened.topology.world_size
    return Report(url=opened.url, format=opened.format,
                  description=facts.get("description", opened.description), engine=opened.engine,
                  step=opened.step, topology=opened.topology, world_size=world,
                  commit=facts.get("commit", "none"), params=_param_rows(opened),
                  buffers=_buffer_rows(opened),
                  param_groups=tuple(_jsonable(opened.param_groups())), bytes_exact=exact,
                  spec=_spec_label(opened), files=facts.get("files"),
                  size_on_disk=facts.get("size"), steps=facts.get("steps"), notes=tuple(notes))


def _param_rows(opened: Opened) -> tuple[TensorRow, ...]:
    table = opened.table.get("params") or {}
    rows = []
    for name in opened.names():
        info = opened.info(name)
        nbytes = int(table[name]["nbytes"]) if name in table else _estimate_bytes(info)
        rows.append(TensorRow(name, tuple(info.shape), dtype_name(info.dtype), tuple(info.states),
                              nbytes, bool(info.frozen), info.group))
    return tuple(rows)


def _buffer_rows(opened: Opened) -> tuple[TensorRow, ...]:
    rows = []
    for name in opened.buffer_names():
        shape, dtype = opened.buffer_info(name)
        rows.append(TensorRow(name, tuple(shape), dtype_name(dtype), ("param",),
                              math.prod(shape) * _itemsize(dtype)))
    return tuple(rows)


def _stored(opened: Opened, storage_options: Mapping[str, Any] | None,
            notes: list[str]) -> dict[str, Any]:
    """What each format records about its storage: commit status, files, steps, ranks."""
    src = opened.source
    if opened.format == "universal":
        files, size = _du(src.storage, "")
        return {"commit": "committed", "files": files, "size": size}
    if opened.format == "safetensors":
        return {"files": len(src.files), "size": sum(src.sizes.values())}
    if opened.format == "dcp":  # DCP writes .metadata last: its commit record
        # only the directories read (one step of a torchtitan folder, not its other steps)
        counts = [_du(src.storage, part) for part in getattr(getattr(src, "root", None), "parts", ("",))]
        files = None if any(f is None for f, _ in counts) else sum(f for f, _ in counts)
        size = None if any(n is None for _, n in counts) else sum(n for _, n in counts)
        return {"commit": "committed", "world": getattr(src, "ranks", None), "files": files,
                "size": size}
    if opened.format == "deepspeed" and hasattr(getattr(src, "ckpt", None), "tag_dir"):
        files, size = _du(Storage(str(src.ckpt.tag_dir)), "")
        return {"files": files, "size": size}
    if opened.format != "ucp":
        return {}
    m = src.manifest
    steps = tuple(list_steps(src.storage.url, storage_options=storage_options))
    topo = m.topology
    if opened.spec is None and topo is not None and max(topo.tp, topo.pp, topo.ep, topo.sp) > 1:
        notes.append("saved on tp/pp/ep/sp > 1 and opened without a spec: plain tensors show "
                     "one rank's shape; pass --spec to see canonical names and shapes")
    return {"commit": "committed", "world": m.world_size, "files": len(m.files),
            "size": sum(r.size for r in m.files.values()), "steps": steps,
            "description": f"ucp native checkpoint, step {m.step} "
                           f"({sum(s.committed for s in steps)} committed step(s) under the root)"}


def _estimate_bytes(info: ParamInfo) -> int:
    n = math.prod(info.shape)
    states = [s for s in info.states  # an fp32 model's weights are its fp32 state: count once
              if not (s == "fp32" and "param" in info.states and info.dtype == torch.float32)]
    return sum(n * _itemsize(info.dtype) if s == "param" else 4 if s == "step" else n * 4
               for s in states)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _spec_label(opened: Opened) -> str | None:
    if opened.spec is None:
        return None
    return f"{opened.spec_label or opened.spec.source} ({len(opened.spec.rules)} rules)"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else repr(obj)


def _du(storage: Storage, rel: str) -> tuple[int | None, int | None]:
    """(file count, total bytes) below ``rel``; (None, None) when the store cannot list them."""
    try:
        found = storage.fs.find(storage.path(rel), detail=True)
    except (OSError, NotImplementedError):
        return None, None
    sizes = [int(i.get("size") or 0) for i in found.values() if i.get("type") != "directory"]
    return len(sizes), sum(sizes)


# -- ls --------------------------------------------------------------------------------------------
