"""Read torch.distributed.checkpoint (DCP) directories parameter by parameter.

:class:`DcpCheckpoint` opens a directory written by ``torch.distributed.checkpoint.save`` with the
default ``FileSystemWriter`` (``.metadata`` and ``__<rank>_<n>.distcp`` files), on local disk or any
fsspec URL. Opening reads the metadata (a pickle, unpickled with a narrow allow-list, see
``_dcp_meta``) and the small values (optimizer hyper-parameters, step counters); each
:meth:`~DcpCheckpoint.read` then assembles one global tensor from its chunks, reading only their
byte ranges, so a converter that walks :meth:`~DcpCheckpoint.names` holds about one tensor at a time.

Which keys hold what (``{"model": ..., "optim": ...}`` from ``get_state_dict``) is described in
``_dcp_layout`` and ``docs/formats/dcp.md``.

Example::

    ckpt = DcpCheckpoint("runs/step-1000")
    for name in ckpt.names():
        info = ckpt.info(name)
        tensors = {state: ckpt.read(name, state) for state in info.states}
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any, Mapping

import torch

from ucp.storage import Storage

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError, UcpError
from ucp.core._topology import Topology
from .._base import ParamInfo, Region, cut
from ._blobs import Blob, BlobReader
from ._fused import FusedCache, FusedPart, check_head_dim, split_part
from ._layout import Layout, plan_layout
from ._meta import DcpMetadata, ObjectEntry, TensorEntry, merge_metadata, parse_metadata
from ._roots import (ACCEL_SCHEDULER, METADATA as _METADATA, RANK_METADATA as _RANK_METADATA, Root,
                     accelerate_part_hint, find_root, merge_parts)

__all__ = ["DcpCheckpoint", "detect"]

_DATA_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
#: Chunk lists longer than this skip the pairwise overlap check (the element count is still checked).
_PAIRWISE_LIMIT = 256
#: Top-level keys taken as the step when the optimizer keeps no ``step`` state.
_STEP_KEYS = ("step", "global_step")

Entry = TensorEntry | ObjectEntry
log = logging.getLogger("ucp")


def detect(url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> str | None:
    """A one-line description when ``url`` is a DCP directory, a torchtitan checkpoint folder or an
    accelerate FSDP ``save_state`` folder (by names only, see ``_roots``), else None."""
    storage = Storage(url, storage_options=storage_options)
    root = find_root(storage)
    if root is None:
        return None
    if root.kind == "dcp":
        data = [n for n in storage.list("") if n.endswith(".distcp")]
        return f"torch.distributed.checkpoint directory: .metadata and {len(data)} .distcp file(s)"
    return root.describe()


class DcpCheckpoint:
    """A DCP checkpoint directory, opened for conversion.

    Parameters are the model tensors the optimizer knows (listed in a param group or holding
    optimizer state), plus model tensors saved in several chunks (sharded, so parameters, e.g. frozen
    ones under FSDP2). The other model tensors are buffers. A checkpoint without an optimizer section
    has only parameters. States of a parameter: ``param`` (as saved), ``fp32`` (the same tensor, when
    it is float32: DCP keeps no separate master copy) and every optimizer tensor state (``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``, ...); ``step`` is reported as :attr:`step`.

    Args:
        url: the directory (local path or fsspec URL such as ``s3://bucket/ckpt``), or a root that
            holds DCP directories: a torchtitan checkpoint folder (``step-<N>/``) or an accelerate
            FSDP ``save_state`` folder (``pytorch_model_fsdp_0/`` + ``optimizer_0/``); see ``_roots``.
        storage_options: fsspec options (credentials, endpoint).
        tag: torchtitan: the step to read (default: the newest complete one).
        head_dim: the attention head size, needed only to split torchtitan's fused ``wqkv``
            optimizer states onto ``wq``/``wk``/``wv`` (see ``_fused``).
        model_key, optim_key: the top-level keys of the model and optimizer state dicts; default:
            detected (``model``; ``optim`` or ``optimizer``).
        allow_unsafe_pickle: load saved values with the full pickle machinery, which can run code
            from the files. Only for checkpoints you trust whose values are more than tensors and
            plain Python data. (``.metadata`` is always read with the restricted unpickler.)

    Attributes:
        engine: ``"dcp"``. step: the optimizer's step (the largest over parameters), or None.
        root: which DCP directories were read (kind, parts, torchtitan's step).
        topology: None (DCP records chunks, not the parallel layout; no spec is needed).
        ranks: the number of ranks that wrote data files (from their ``__<rank>_`` names).
        version: DCP's format version string. files: the data files.

    Raises:
        CheckpointNotFoundError: no metadata at ``url``, or a data file it names is missing.
        CorruptCheckpointError: malformed metadata, a truncated data file, chunks that do not tile a
            tensor, or an optimizer that names parameters the model lacks.
        UnsafeInputError: the metadata pickle or a value would run code.
        ConvertError: a layout this reader does not handle.
    """

    engine = "dcp"

    def __init__(self, url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None,
                 model_key: str | None = None, optim_key: str | None = None,
                 allow_unsafe_pickle: bool = False, tag: str | None = None,
                 head_dim: int | None = None) -> None:
        self.url = os.fspath(url)
        self.storage = Storage(self.url, storage_options=storage_options)
        self._blobs = BlobReader(self.storage, allow_unsafe_pickle=allow_unsafe_pickle)
        self.root: Root = find_root(self.storage, tag=tag) or Root("dcp", ("",))
        self.metadata: DcpMetadata = merge_parts({p: _read_part(self.storage, p) for p in self.root.parts},
                                                 where=self.url)
        self.version = self.metadata.version
        self.files = self.metadata.files
        ranks = {m.group(1) for f in self.files if (m := _DATA_FILE.match(f.rpartition("/")[2]))}
        self.ranks: int | None = len(ranks) or None
        self.topology: Topology | None = None
        try:
            self.layout: Layout = plan_layout(self.metadata, where=self.url, model_key=model_key,
                                              optim_key=optim_key)
        except ConvertError as e:
            hint = accelerate_part_hint(self.url)
            if hint is None:
                raise
            raise ConvertError(f"{e}; {hint}") from e
        self.head_dim = head_dim  # checked when a fused state is read: inspect needs none
        self._fused = FusedCache()
        self._groups, group_of = self._read_groups()
        self.step = self._read_step()
        if self.root.kind == "torchtitan":
            self._titan_step()
        self._params: dict[str, ParamInfo] = {}
        self._buffers: list[str] = []
        self._classify(group_of)

    # -- SourceCheckpoint --------------------------------------------------------------------
    def names(self) -> list[str]:
        """Parameter FQNs, in the order the checkpoint lists them."""
        return list(self._params)

    def info(self, name: str) -> ParamInfo:
        """Shape, dtype, states, frozen flag and param group of parameter ``name``.

        Raises:
            KeyError: no such parameter.
        """
        try:
            return self._params[name]
        except KeyError:
            hint = " (it is a buffer: see buffers())" if name in self._buffers else ""
            raise KeyError(f"{self.url}: no parameter {name!r} in this DCP checkpoint{hint}") from None

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        """The global tensor of one state of one parameter (or ``region`` of it), assembled
        from its chunks.

        Raises:
            KeyError: no such parameter. ConvertError: the parameter has no such state.
            CheckpointNotFoundError, CorruptCheckpointError: a missing, truncated or damaged file.
        """
        info = self.info(name)
        if state not in info.states:
            raise ConvertError(f"{self.url}: parameter {name!r} has no state {state!r}; it has "
                               f"{', '.join(info.states)}" + (" (no fp32 copy: the model is "
                                                              f"{info.dtype})" if state == "fp32" else ""))
        if state in ("param", "fp32"):
            return cut(self._assemble(self.layout.model[name]), region)
        entry = self.layout.states[name][state]
        if isinstance(entry, FusedPart):
            check_head_dim(self.head_dim, entry, self.url)
            assert self.head_dim is not None
            fused = self._fused.take(entry, lambda: self._assemble(entry.source))
            return cut(split_part(fused, entry, self.head_dim), region)
        assert isinstance(entry, TensorEntry)
        return cut(self._assemble(entry), region)

    def buffers(self) -> dict[str, torch.Tensor]:
        """Model tensors that are not parameters (see the class docstring), read whole."""
        return {name: self._assemble(self.layout.model[name]) for name in self._buffers}

    def param_groups(self) -> list[dict[str, Any]]:
        """Hyper-parameters of each optimizer param group (JSON-able values; no ``params`` list)."""
        return [dict(g) for g in self._groups]

    def extras(self) -> dict[str, Any]:
        """The rest of the training state, as far as JSON holds it: saved values outside the model and
        optimizer (torchtitan's ``lr_scheduler`` and ``train_state``; one-element tensors as numbers),
        nested by their keys, and accelerate's ``scheduler.bin`` as ``scheduler``. Values JSON cannot
        hold (tensors, custom objects) are left out."""
        entries = [e for e in self.layout.extras.values()
                   if isinstance(e, ObjectEntry) or math.prod(e.shape) == 1]
        out: dict[str, Any] = {}
        for e, v in zip(entries, self._extra_values(entries)):
            _nest(out, [str(p) for p in e.path], _jsonable(v))
        if self.root.kind == "accelerate" and self.storage.exists(ACCEL_SCHEDULER):
            _nest(out, ["scheduler"], _jsonable(self._accelerate_scheduler()))
        return out

    def _extra_values(self, entries: list[Entry]) -> list[Any]:
        """The values of ``entries`` (merged reads); one that cannot be loaded is left out with a
        warning: side state (a data loader's, say) must not stop a conversion."""
        try:
            return self._values(entries)
        except UcpError:
            pass
        out: list[Any] = []
        for e in entries:
            try:
                out.append(self._values([e])[0])
            except UcpError as err:
                log.warning("ucp: %s: %r left out of the extras: %s", self.url, e.key, err)
                out.append(_DROP)
        return out

    def _accelerate_scheduler(self) -> Any:
        size = self.storage.size(ACCEL_SCHEDULER)
        try:
            return self._blobs.objects([(ACCEL_SCHEDULER, 0, size, (), "the scheduler state")])[0]
        except UcpError as e:  # a side file: the conversion goes on without it
            log.warning("ucp: %s/%s left out of the extras: %s", self.url, ACCEL_SCHEDULER, e)
            return _DROP

    def __repr__(self) -> str:
        return (f"DcpCheckpoint({self.url!r}, {len(self._params)} parameters, {len(self._buffers)} "
                f"buffers, step={self.step})")

    def __enter__(self) -> DcpCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    # -- opening -----------------------------------------------------------------------------
    def _values(self, entries: list[Entry]) -> list[Any]:
        """Small values (objects, one-chunk tensors) with merged reads; others assembled."""
        simple = [i for i, e in enumerate(entries) if isinstance(e, ObjectEntry) or len(e.chunks) == 1]
        out: list[Any] = [None] * len(entries)
        for i, v in zip(simple, self._blobs.objects([_blob(entries[i]) for i in simple])):
            out[i] = v
        for i in sorted(set(range(len(entries))) - set(simple)):
            entry = entries[i]
            assert isinstance(entry, TensorEntry)
            out[i] = self._assemble(entry)
        return out

    def _read_groups(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        lay = self.layout
        if lay.flattened:
            return self._groups_from_params()
        indices = sorted(set(lay.groups) | set(lay.members))
        wanted = [(g, "params", e) for g, e in sorted(lay.members.items())]
        wanted += [(g, n, e) for g in indices for n, e in lay.groups.get(g, {}).items()]
        values: dict[int, dict[str, Any]] = {g: {} for g in indices}
        for (g, n, _), v in zip(wanted, self._values([e for _, _, e in wanted])):  # one batch: few reads
            values[g][n] = v
        groups: list[dict[str, Any]] = []
        group_of: dict[str, int] = {}
        for pos, g in enumerate(indices):
            groups.append(_jsonable_dict(values[g]))
            if g not in lay.members:
                continue
            names = values[g]["params"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise CorruptCheckpointError(f"{self.url}: {lay.members[g].key!r} is not a list of "
                                             "parameter names")
            for n in (part for n in names for part in lay.fused.get(n, (n,))):
                if n in lay.model:  # names the model section lacks cannot be converted anyway
                    if group_of.setdefault(n, pos) != pos:
                        raise CorruptCheckpointError(f"{self.url}: parameter {n!r} is in param groups "
                                                     f"{group_of[n]} and {pos}")
        return groups, group_of

    def _groups_from_params(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Flattened layout: params with equal hyper-parameters form one group, in model order."""
        lay = self.layout
        fqns = [f for f in lay.model if f in lay.per_param]
        flat = [(f, n, e) for f in fqns for n, e in lay.per_param[f].items()]
        values = iter(self._values([e for _, _, e in flat]))
        per: dict[str, dict[str, Any]] = {f: {} for f in fqns}
        for f, n, _ in flat:
            per[f][n] = next(values)
        groups: list[dict[str, Any]] = []
        seen: dict[str, int] = {}
        group_of: dict[str, int] = {}
        for f in fqns:
            hps = _jsonable_dict(per[f])
            key = json.dumps(hps, sort_keys=True)
            if key not in seen:
                seen[key] = len(groups)
                groups.append(hps)
            group_of[f] = seen[key]
        return groups, group_of

    def _read_step(self) -> int | None:
        lay = self.layout
        entries = [s["step"] for s in lay.states.values() if "step" in s]
        if not entries:
            entries = [lay.extras[k] for k in _STEP_KEYS if k in lay.extras][:1]
        steps = [_number(v) for v in self._values(entries)]
        steps = [s for s in steps if s is not None]
        return int(max(steps)) if steps else None

    def _titan_step(self) -> None:
        """A torchtitan step without optimizer (its last, by default) still has its folder's step."""
        if self.step is None:
            self.step = self.root.step
        if self.layout.optim_key is None:
            log.warning("ucp: %s/step-%s holds the model only (torchtitan saves its last step so, "
                        "checkpoint.last_save_model_only); --step picks an earlier step with the "
                        "optimizer state (steps: %s)", self.url, self.root.step,
                        ", ".join(map(str, self.root.steps)))

    def _classify(self, group_of: dict[str, int]) -> None:
        lay = self.layout
        for fqn, entry in lay.model.items():
            states = {n: e for n, e in lay.states.get(fqn, {}).items() if n != "step"
                      and isinstance(e, (TensorEntry, FusedPart))}
            if lay.optim_key is not None and fqn not in group_of and not states \
                    and len(entry.chunks) <= 1:
                self._buffers.append(fqn)
                continue
            base = ("param", "fp32") if entry.dtype == torch.float32 else ("param",)
            clash = set(base) & set(states)
            if clash:
                raise ConvertError(f"{self.url}: optimizer state {sorted(clash)[0]!r} of {fqn!r} has the "
                                   "name of a model state; rename it before converting")
            self._params[fqn] = ParamInfo(shape=entry.shape, dtype=entry.dtype,
                                          states=base + tuple(sorted(states)),
                                          frozen=lay.optim_key is not None and not states,
                                          group=group_of.get(fqn))
        if lay.fused:  # the model section lists wq/wk/wv last: the optimizer's
            # order has them where the fused parameter stood (a DeepSpeed ZeRO target follows it)
            trained = [fqn for fqn in lay.states if fqn in self._params]
            self._params = {**{fqn: self._params[fqn] for fqn in trained}, **self._params}
        orphans = sorted(set(lay.states) - set(self._params))
        if orphans:
            raise CorruptCheckpointError(f"{self.url}: optimizer state for {orphans[0]!r}, which the model "
                                         "section does not hold as a tensor")

    # -- tensors -----------------------------------------------------------------------------
    def _assemble(self, entry: TensorEntry) -> torch.Tensor:
        """The global tensor of ``entry``: one chunk read at a time into the result."""
        _check_tiling(entry, self.url)
        chunks = sorted(entry.chunks, key=lambda c: (c.file, c.start))
        if len(chunks) == 1 and chunks[0].sizes == entry.shape:
            t = _checked(self._blobs.tensor(_blob(entry, chunks[0])), entry, chunks[0].sizes, self.url)
            return t.clone() if t.untyped_storage().nbytes() > t.nbytes else t
        out = torch.empty(entry.shape, dtype=entry.dtype)
        for c, t in zip(chunks, self._blobs.tensors(_blob(entry, c) for c in chunks)):
            region = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
            out[region] = _checked(t, entry, c.sizes, self.url)
        return out


# -- helpers -----------------------------------------------------------------------------------
def _read_part(storage: Storage, part: str) -> DcpMetadata:
    """The checked metadata of one DCP directory (``part`` of the root; '' is the root itself)."""
    where = storage.child(part) if part else storage
    listing = where.list("")
    meta = _read_metadata(where, listing)
    _check_files(where, meta, listing)
    return meta


def _read_metadata(storage: Storage, listing: list[str]) -> DcpMetadata:
    where = f"{storage.url}/{_METADATA}"
    if _METADATA in listing:
        return parse_metadata(storage.read(_METADATA), where=where)
    per_rank = sorted((n for n in listing if _RANK_METADATA.match(n)),
                      key=lambda n: int(_RANK_METADATA.match(n).group(1)))  # type: ignore[union-attr]
    if not per_rank:
        raise CheckpointNotFoundError(
            f"{where}: not found; a torch.distributed.checkpoint directory holds .metadata (written last by "
            "dcp.save) and __<rank>_<n>.distcp files. Is the save complete, and is this the right path?")
    parts = [parse_metadata(storage.read(n), where=f"{storage.url}/{n}") for n in per_rank]
    return merge_metadata(parts, where=storage.url)


def _check_files(storage: Storage, meta: DcpMetadata, listing: list[str]) -> None:
    """Every data file the metadata names exists and is long enough for its items."""
    missing = [f for f in meta.files if f not in listing]
    if missing:
        raise CheckpointNotFoundError(
            f"{storage.url}: missing data file(s) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} named by .metadata ({len(meta.files)} in all); "
            "copy every rank's __<rank>_<n>.distcp file")
    ends: dict[str, int] = {}
    for t in meta.tensors.values():
        for c in t.chunks:
            ends[c.file] = max(ends.get(c.file, 0), c.start + c.length)
    for o in meta.objects.values():
        ends[o.file] = max(ends.get(o.file, 0), o.start + o.length)
    files = sorted(ends)
    for f, size in zip(files, storage.map(storage.size, files)):
        if size < ends[f]:
            raise CorruptCheckpointError(
                f"{storage.url}/{f}: truncated: {size} bytes, but .metadata places items up to byte "
                f"{ends[f]}; the file was cut short (interrupted copy or save), restore it")


def _blob(entry: Entry, chunk: Any = None) -> Blob:
    if isinstance(entry, ObjectEntry):
        return (entry.file, entry.start, entry.length, entry.transforms, entry.key)
    c = chunk if chunk is not None else entry.chunks[0]
    return (c.file, c.start, c.length, c.transforms, entry.key if len(entry.chunks) == 1
            else f"{entry.key} chunk at {list(c.offsets)}")


def _check_tiling(entry: TensorEntry, where: str) -> None:
    """The chunks cover the tensor exactly: element counts add up and no two overlap."""
    total = sum(math.prod(c.sizes) for c in entry.chunks)
    overlap = None
    if len(entry.chunks) <= _PAIRWISE_LIMIT:
        live = [c for c in entry.chunks if math.prod(c.sizes)]
        overlap = next(((a, b) for i, a in enumerate(live) for b in live[i + 1:]
                        if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs
                               in zip(a.offsets, a.sizes, b.offsets, b.sizes))), None)
    if total != math.prod(entry.shape) or overlap:
        detail = (f"chunks at {list(overlap[0].offsets)} and {list(overlap[1].offsets)} overlap"
                  if overlap else f"its chunks hold {total} of {math.prod(entry.shape)} elements")
        raise CorruptCheckpointError(f"{where}: tensor {entry.key!r} of shape {list(entry.shape)}: {detail}; "
                                     "the metadata is inconsistent (mixed saves?)")


def _checked(t: torch.Tensor, entry: TensorEntry, sizes: tuple[int, ...], where: str) -> torch.Tensor:
    if tuple(t.shape) != sizes or t.dtype != entry.dtype:
        raise CorruptCheckpointError(f"{where}: a chunk of {entry.key!r} holds {t.dtype} {list(t.shape)}, "
                                     f"but .metadata says {entry.dtype} {list(sizes)}")
    return t


def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v
    return None


_DROP = object()


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        items = [_jsonable(x) for x in v]
        return _DROP if any(x is _DROP for x in items) else items
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        d = {k: _jsonable(x) for k, x in v.items()}
        return _DROP if any(x is _DROP for x in d.values()) else d
    return _DROP


def _nest(out: dict[str, Any], path: list[str], value: Any) -> None:
    """Sets ``out[path[0]][path[1]]... = value`` (a key that is already a value keeps the dotted path)."""
    if value is _DROP:
        return
    node = out
    for head in path[:-1]:
        child = node.setdefault(head, {})
        if not isinstance(child, dict):
            out[".".join(path)] = value
            return
        node = child
    node[path[-1]] = value


def _jsonable_dict(values: dict[str, Any]) -> dict[str, Any]:
    """Keeps the JSON-able hyper-parameters (tuples become lists, 1-element tensors numbers)."""
    out = {k: _jsonable(v) for k, v in values.items() if k != "params"}
    return {k: v for k, v in out.items() if v is not _DROP}
