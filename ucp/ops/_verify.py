"""``ucp verify``: every checksum, every parameter covered exactly once, shapes that fit the spec.

What is checked depends on what the format records:

* **ucp native**: each file of the step against its manifest record (size, CRC32C), each tensor
  against the CRC32C of its fragment record, in one streaming pass per file; each rank's fragment
  table against its safetensors header; then coverage: a DTensor's distinct regions tile its
  global shape exactly once (replicas agree), a plain tensor is laid out as the spec says (each
  holder's local shape, no rank missing or extra) or, without a spec, its copies are identical.
* **universal**: every chunk of every array is read, so zarr's CRC32C codec checks it; each array
  has the shape and dtype the parameter table records.
* **DCP, DeepSpeed, other engines**: the engine's own checks on opening, then every state of every
  parameter is assembled (its pieces must cover it) and must have the recorded shape.
* **safetensors**: no checksums exist; headers, offsets and the index's weight map are checked.

With a spec (given, or stored in the checkpoint), the canonical shapes are also checked against it
(``Spec.check``). Memory stays bounded: files stream in blocks, tensors are read one at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
from typing import Any, Callable, Mapping

import crc32c as _crc32c

from ucp.storage import Storage

from ucp.core._errors import ChecksumError, CorruptCheckpointError, UcpError, UcpSpecError
from ucp.core._fingerprint import ALGORITHM, fingerprint, fingerprint_box, to_hex
from ucp.ops._inspect import (SCHEMA_VERSION, INDEX, Opened, SafetensorsFiles, detect_format,
                       display_url, open_checkpoint)
from ucp.native._catalog import index_from_doc
from ucp.native._meta import MAX_JSON_BYTES, Manifest, RankIndex, TensorFragment, loads, rank_stem, step_dir
from ucp.core._topology import Topology
from ucp.engines._open import layout_spec, spec_of
from ucp.universal._checkpoint import OpenedArray, _check_region

__all__ = ["Problem", "VerifyReport", "verify_checkpoint"]

#: Bytes read at a time when streaming a file through its checksums.
BLOCK = 8 * 2**20


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong. ``kind``: checksum, missing, structure, coverage, shape, spec, read or
    fingerprint."""

    kind: str
    where: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "where": self.where, "message": self.message}

    def __str__(self) -> str:
        return f"{self.kind}: {self.where}: {self.message}"


@dataclasses.dataclass
class VerifyReport:
    """The result of :func:`verify_checkpoint` (``to_dict()`` is ``ucp verify --json``)."""

    url: str
    format: str
    step: int | None = None
    problems: list[Problem] = dataclasses.field(default_factory=list)
    checked: dict[str, int] = dataclasses.field(default_factory=lambda: {
        "files": 0, "chunks": 0, "tensors": 0, "params": 0, "bytes": 0})
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, where: str, message: str) -> None:
        problem = Problem(kind, where, message)
        if problem not in self.problems:
            self.problems.append(problem)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "ucp.verify", "schema_version": SCHEMA_VERSION,
                "url": display_url(self.url), "format": self.format, "step": self.step,
                "ok": self.ok, "checked": dict(self.checked),
                "problems": [p.to_dict() for p in self.problems], "notes": list(self.notes)}


def verify_checkpoint(url: str, *, engine: str = "auto", spec: Any = None, tag: str | None = None,
                      storage_options: Mapping[str, Any] | None = None,
                      progress: bool | None = None, deep: bool = False) -> VerifyReport:
    """Checks the checkpoint at ``url`` and returns every problem found (it raises only when the
    checkpoint cannot be opened at all).

    Args:
        url: local path or fsspec URL of any format ``ucp inspect`` reads.
        engine: ``auto`` or a forced format (see :func:`ucp.ops._inspect.open_checkpoint`).
        spec: a UCL spec; default: the one the checkpoint stores (manifest or universal).
        tag: the step of a native root (default: the newest committed) or an engine's tag.
        storage_options: fsspec options (credentials, endpoint); never shown.
        progress: a progress bar on stderr (default: when stderr is a terminal).
        deep: also recompute each array's fingerprint from its data and compare it with the one
            recorded at conversion (universal checkpoints) or, per fragment, at save (native
            ones); see :mod:`ucp.core._fingerprint`.

    Returns:
        A :class:`VerifyReport`; ``.ok`` is True when nothing is wrong.

    Raises:
        CheckpointNotFoundError, ConvertError, CorruptCheckpointError: cannot be opened.
    """
    progress = sys.stderr.isatty() if progress is None else progress
    fmt, _ = detect_format(url, engine=engine, storage_options=storage_options)
    report = VerifyReport(url=url, format=fmt)
    if fmt == "ucp":
        _NativeVerifier(url, report, spec=spec, tag=tag, storage_options=storage_options,
                        progress=progress, deep=deep).run()
        if deep:
            report.notes.append(f"--deep: every fragment's fingerprint ({ALGORITHM}) that its save "
                                "recorded was recomputed from its data")
    elif fmt == "safetensors":
        _verify_safetensors(url, report, storage_options)
    else:
        opened = open_checkpoint(url, engine=fmt, spec=spec, tag=tag,
                                 storage_options=storage_options)
        report.step = opened.step
        if fmt == "universal":
            _verify_universal(opened, report, progress, deep=deep)
        else:
            _verify_by_reading(opened, report, progress)
        _check_spec(opened.spec, _shapes(opened), opened.topology, report)
    if deep and fmt not in ("universal", "ucp"):
        report.notes.append(f"--deep: a {fmt} checkpoint records no fingerprints to recompute; "
                            "`ucp diff` compares it with its conversion value by value")
    return report


def _bar(total: int, desc: str, progress: bool, unit: str = "it") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress,
                unit_scale=unit == "B", leave=False)


def _shapes(opened: Opened) -> dict[str, tuple[int, ...]]:
    return {n: tuple(opened.info(n).shape) for n in opened.names()}


def _check_spec(spec: Any, shapes: Mapping[str, tuple[int, ...]], topology: Topology | None,
                report: VerifyReport) -> None:
    if layout_spec(spec) is None:  # no spec, or constants only (a reader's hint)
        return
    for p in spec.check(shapes, topology=topology):
        where = p.param or (f"{spec.source}:{p.line}" if p.line else spec.source)
        report.add("spec", where, f"{p.kind}: {p.message}")


# -- universal: read every chunk ------------------------------------------------------------------

def _verify_universal(opened: Opened, report: VerifyReport, progress: bool, *, deep: bool = False) -> None:
    """Reads every chunk of every array, a band of chunk rows at a time (zarr's crc32c codec
    checks each chunk), and compares each array with the parameter table (``deep``: and its
    fingerprint, summed band by band, with the recorded one)."""
    from ucp.universal._zarr import zarr_store

    store = zarr_store(opened.source.storage, read_only=True)
    params = opened.table.get("params") or {}
    buffers = opened.table.get("buffers") or {}
    arrays = [(f"{e['path']}/{state}", name, state, e) for name, e in params.items()
              for state in e.get("states", ())]
    arrays += [(e["path"], name, "buffer", e) for name, e in buffers.items()]
    report.checked["params"] = len(params)
    report.notes.append("every chunk was read; zarr's crc32c codec checked each one")
    if deep:
        _note_fingerprints(opened.table, report)
    bar = _bar(sum(int(e.get("nbytes", 0)) for e in [*params.values(), *buffers.values()]),
               "verify", progress, "B")
    try:
        for path, name, state, entry in arrays:
            want = _recorded(entry, state) if deep else None
            _check_array(store, opened.source.storage, path, f"{name} ({state})", entry, state, report,
                         bar, want)
    finally:
        bar.close()


def _note_fingerprints(table: Mapping[str, Any], report: VerifyReport) -> None:
    if table.get("fingerprint_algorithm") == ALGORITHM:
        report.notes.append(f"every array's fingerprint ({ALGORITHM}) was recomputed from its data")
    else:
        report.notes.append("no fingerprints are recorded (converted with --no-verify, or by an older "
                            "ucp): --deep checked the checksums only; convert again to record them")


def _recorded(entry: Mapping[str, Any], state: str) -> str | None:
    """The fingerprint the table records for one array (None: none recorded)."""
    value = entry.get("fingerprint") if state == "buffer" else (entry.get("fingerprints") or {}).get(state)
    return value if isinstance(value, str) else None


def _check_array(store: Any, storage: Storage, path: str, where: str, entry: Mapping[str, Any],
                 state: str, report: VerifyReport, bar: Any, want: str | None = None) -> None:
    import numpy as np
    import torch
    import zarr

    try:
        arr = zarr.open_array(store, path=path, mode="r")
        opened = OpenedArray(path, tuple(arr.shape), tuple(arr.chunks), torch.uint8, arr.dtype, None, arr)
        _check_region(storage, opened, None)  # a huge shape in tiny chunks: not read band by band
    except (FileNotFoundError, KeyError, ValueError) as e:
        report.add("structure" if isinstance(e, CorruptCheckpointError) else "missing", where,
                   f"array {path} cannot be opened ({_one_line(e)})")
        return
    if state != "step" and tuple(arr.shape) != tuple(entry["shape"]):
        report.add("shape", where, f"array {path} has shape {list(arr.shape)}, the parameter "
                   f"table says {list(entry['shape'])}")
    if state in ("param", "buffer") and arr.attrs.get("ucp_dtype") != entry.get("dtype"):
        report.add("structure", where, f"array {path} holds {arr.attrs.get('ucp_dtype')}, the "
                   f"parameter table says {entry.get('dtype')}")
    rows = arr.chunks[0] if arr.ndim else 1
    fp, complete = 0, True
    for start in range(0, max(1, arr.shape[0] if arr.ndim else 1), rows):
        region = (slice(start, start + rows),) if arr.ndim else ()
        try:
            band = arr[region] if arr.ndim else arr[()]
        except ValueError as e:
            kind = "checksum" if "checksum" in str(e).lower() else "read"
            report.add(kind, where, f"{path}: rows {start}..{start + rows - 1}: {_one_line(e)}")
            complete = False
            continue
        if want is not None:
            fp += fingerprint_box(torch.from_numpy(np.ascontiguousarray(band)), (start,) + (0,) * (arr.ndim - 1),
                                  arr.shape) if arr.ndim else fingerprint(torch.from_numpy(np.asarray(band)))
        nbytes = int(getattr(band, "nbytes", 0))
        report.checked["bytes"] += nbytes
        bar.update(nbytes)
    report.checked["chunks"] += int(arr.nchunks)
    report.checked["tensors"] += 1
    if want is not None and complete and to_hex(fp) != want:
        report.add("fingerprint", where, f"{path}: the data's fingerprint {to_hex(fp)} differs from "
                   f"the {want} recorded when it was written (its values changed since, though every "
                   "chunk's CRC32C matches); convert the checkpoint again")


# -- engine sources: read everything -------------------------------------------------------------

def _verify_by_reading(opened: Opened, report: VerifyReport, progress: bool) -> None:
    """Reads every state of every parameter (one at a time) and every buffer."""
    names = opened.names()
    report.checked["params"] = len(names)
    bar = _bar(len(names), "verify", progress, "param")
    try:
        for name in names:
            try:
                info = opened.info(name)
            except (UcpError, KeyError) as e:
                report.add("structure", name, _one_line(e))
                continue
            for state in info.states:
                _check_read(lambda: opened.read(name, state), name, state,
                            None if state == "step" else tuple(info.shape), report)
            bar.update(1)
        for name in opened.buffer_names():
            shape, _ = opened.buffer_info(name)
            _check_read(lambda: opened.read_buffer(name), name, "buffer", tuple(shape), report)
    finally:
        bar.close()


def _check_read(read: Callable[[], Any], name: str, state: str, shape: tuple[int, ...] | None,
                report: VerifyReport) -> None:
    try:
        t = read()
    except UcpError as e:
        kind = "checksum" if "crc32c" in str(e).lower() or "checksum" in str(e).lower() else "read"
        report.add(kind, f"{name} ({state})", _one_line(e))
        return
    except (KeyError, OSError, ValueError, RuntimeError) as e:
        report.add("read", f"{name} ({state})", f"{type(e).__name__}: {_one_line(e)}")
        return
    report.checked["tensors"] += 1
    report.checked["bytes"] += t.numel() * t.element_size()
    if shape is not None and tuple(t.shape) != shape:
        report.add("shape", f"{name} ({state})", f"read shape {list(t.shape)}, but the "
                   f"checkpoint records {list(shape)}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# -- safetensors: structure only -----------------------------------------------------------------

def _verify_safetensors(url: str, report: VerifyReport,
                        storage_options: Mapping[str, Any] | None) -> None:
    report.notes.append("safetensors records no checksums: headers, offsets and the index were "
                        "checked, not the tensor bytes")
    try:
        files = SafetensorsFiles(url, storage_options=storage_options)
    except UcpError as e:
        report.add("structure", display_url(url), _one_line(e))
        return
    report.checked["files"] = len(files.files)
    report.checked["tensors"] = report.checked["params"] = len(files.entries)
    report.checked["bytes"] = sum(files.sizes.values())
    if files.index is None:
        return
    weight_map = files.index["weight_map"]
    for name, (f, *_rest) in files.entries.items():
        if weight_map.get(name) != f:
            report.add("structure", INDEX, f"{name!r} is in {f}, but the index maps it to "
                       f"{weight_map.get(name)!r}")
    for name in sorted(set(weight_map) - set(files.entries)):
        report.add("missing", INDEX, f"{name!r} is in the weight_map, but in no file")
    total = (files.index.get("metadata") or {}).get("total_size")
    actual = sum(stop - start for _, _, _, start, stop in files.entries.values())
    if total is not None and total != actual:
        report.add("structure", INDEX, f"metadata.total_size is {total}, but the tensors hold "
                   f"{actual} bytes")


# -- ucp native ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Held:
    rank: int
    frag: TensorFragment


class _NativeVerifier:
    """Checks one committed step of a native checkpoint (see the module docstring)."""

    def __init__(self, url: str, report: VerifyReport, *, spec: Any, tag: str | None,
                 storage_options: Mapping[str, Any] | None, progress: bool, deep: bool = False) -> None:
        from ucp.native._source import _resolve_root

        self.report, self.progress, self.deep = report, progress, deep
        self.root, step = _resolve_root(url, storage_options, tag)
        from ucp.native._layout import read_manifest

        self.manifest: Manifest = read_manifest(self.root, step)
        report.step = step
        self.sd = step_dir(step)
        self.topology = self.manifest.topology
        if spec is None and self.manifest.spec:
            spec = self.manifest.spec
            report.notes.append("spec: the one recorded in the manifest")
        self.spec = spec_of(spec)

    def run(self) -> None:
        indexes = self._rank_indexes()
        self._checksums(indexes)
        table = self._fragments(indexes)
        self.report.checked["params"] = len({n for n, s in table if s == "param"})
        shapes: dict[str, tuple[int, ...]] = {}
        for (name, state), held in table.items():
            shape = self._coverage(name, state, held)
            if state == "param" and shape is not None:
                shapes[name] = shape
        if self.spec is not None and self.topology is not None:
            _check_spec(self.spec, shapes, self.topology, self.report)

    def _where(self, name: str) -> str:
        return f"{self.sd}/{name}"

    # -- files and checksums ------------------------------------------------------------------
    def _rank_indexes(self) -> dict[int, RankIndex]:
        out = {}
        for rank in range(self.manifest.world_size):
            name = f"{rank_stem(rank)}.json"
            record = self.manifest.files.get(name)
            if record is None:
                self.report.add("missing", self._where(name), "not listed in the manifest")
                continue
            try:
                raw = self.root.read(f"{self.sd}/{name}", max_bytes=MAX_JSON_BYTES)
            except FileNotFoundError:
                self.report.add("missing", self._where(name), "the manifest lists it, but it "
                                "is not there")
                continue
            if not self._file_ok(name, len(raw), _crc32c.crc32c(raw)):
                continue
            try:
                out[rank] = index_from_doc(loads(raw, what=name), what=name, rep=lambda r: _rep(out, r, name))
            except UcpError as e:
                kind = "checksum" if isinstance(e, ChecksumError) else "structure"
                self.report.add(kind, self._where(name), _one_line(e))
        return out

    def _file_ok(self, name: str, size: int, crc: int) -> bool:
        record = self.manifest.files[name]
        self.report.checked["files"] += 1
        self.report.checked["bytes"] += size
        if size != record.size:
            self.report.add("checksum", self._where(name), f"{size} bytes, the manifest records "
                            f"{record.size} (truncated or replaced)")
            return False
        if crc != record.crc32c:
            self.report.add("checksum", self._where(name), f"CRC32C {crc:#010x} differs from the "
                            f"recorded {record.crc32c:#010x} (the file is corrupt)")
            return False
        return True

    def _checksums(self, indexes: Mapping[int, RankIndex]) -> None:
        others = [n for n in sorted(self.manifest.files)
                  if not (n.startswith("rank-") and n.endswith((".json", ".safetensors")))]
        data = [f"{rank_stem(r)}.safetensors" for r in range(self.manifest.world_size)]
        total = sum(self.manifest.files[n].size for n in data + others if n in self.manifest.files)
        bar = _bar(total, "verify", self.progress, "B")
        try:
            for rank, name in enumerate(data):
                if name not in self.manifest.files:
                    self.report.add("missing", self._where(name), "not listed in the manifest")
                    continue
                self._stream_rank_file(name, indexes.get(rank), bar)
            for name in others:
                self._stream_file(name, {}, bar)
        finally:
            bar.close()

    def _stream_rank_file(self, name: str, index: RankIndex | None, bar: Any) -> None:
        from ucp.core._stfile import header_length, parse_header

        rel, record = f"{self.sd}/{name}", self.manifest.files[name]
        ranges: dict[str, tuple[int, int]] = {}
        try:
            n = header_length(self.root.read_range(rel, 0, 8), where=name, size=record.size)
            entries = parse_header(self.root.read_range(rel, 8, 8 + n), where=name,
                                   data_size=record.size - 8 - n)
            ranges = {k: (8 + n + a, 8 + n + b) for k, (_, _, a, b) in entries.items()}
        except FileNotFoundError:
            self.report.add("missing", self._where(name), "the manifest lists it, but it is "
                            "not there")
            return
        except UcpError as e:
            self.report.add("structure", self._where(name), _one_line(e))
            entries = {}
        crcs = self._stream_file(name, ranges, bar)
        if index is None or crcs is None:
            return
        self._compare_fragments(name, index, entries, crcs)
        if self.deep:
            self._compare_fingerprints(name, index, entries, ranges)

    def _compare_fingerprints(self, name: str, index: RankIndex, entries: Mapping[str, Any],
                              ranges: Mapping[str, tuple[int, int]]) -> None:
        """``--deep``: each fragment's fingerprint, recomputed from its bytes, against the one
        recorded when it was saved."""
        from ucp.core._stfile import from_bytes

        rel = f"{self.sd}/{name}"
        for f in index.fragments:
            if f.fingerprint is None or f.key not in ranges:
                continue
            algorithm, _, recorded = f.fingerprint.partition(":")
            if algorithm != ALGORITHM:
                self.report.notes.append(f"{rel}[{f.key}]: fingerprint of another algorithm "
                                         f"({algorithm}) not recomputed")
                continue
            dtype, shape, _, _ = entries[f.key]
            if tuple(shape) != f.shape:
                continue  # reported by _compare_fragments
            t = from_bytes(bytearray(self.root.read_range(rel, *ranges[f.key])), dtype, shape)
            got = to_hex(fingerprint_box(t, f.offsets, f.global_shape) if t.dim() else fingerprint(t))
            if got != recorded:
                self.report.add("fingerprint", f"{rel}[{f.key}]", f"the data's fingerprint {got} differs "
                                f"from the one recorded when it was saved, {recorded}: the values changed "
                                "after the checksum was taken; do not use this step")

    def _stream_file(self, name: str, ranges: Mapping[str, tuple[int, int]],
                     bar: Any) -> dict[str, int] | None:
        """One pass over the file: its CRC32C, and the CRC32C of each ``ranges`` entry."""
        rel = f"{self.sd}/{name}"
        crc, size, crcs = 0, 0, {k: 0 for k in ranges}
        ordered = sorted(ranges.items(), key=lambda kv: kv[1][0])
        try:
            actual = self.root.size(rel)
        except (FileNotFoundError, OSError):
            self.report.add("missing", self._where(name), "the manifest lists it, but it is "
                            "not there")
            return None
        while size < actual:
            block = self.root.read_range(rel, size, min(actual, size + BLOCK))
            if not block:
                break
            crc = _crc32c.crc32c(block, crc)
            lo, hi = size, size + len(block)
            for key, (a, b) in ordered:
                if a < hi and b > lo:
                    crcs[key] = _crc32c.crc32c(block[max(a, lo) - lo:min(b, hi) - lo], crcs[key])
            size = hi
            bar.update(len(block))
        self._file_ok(name, size, crc)  # a bad file still gets per-tensor checks: they say where
        return crcs

    def _compare_fragments(self, name: str, index: RankIndex, entries: Mapping[str, Any],
                           crcs: Mapping[str, int]) -> None:
        from ucp.core._stfile import dtype_name

        for f in index.fragments:
            where = f"{self.sd}/{name}[{f.key}]"
            if f.key not in entries:
                self.report.add("missing", where, "in the fragment table, not in the file")
                continue
            dtype, shape, _, _ = entries[f.key]
            self.report.checked["tensors"] += 1
            if tuple(shape) != f.shape or dtype_name(dtype) != f.dtype:
                self.report.add("structure", where, f"the file holds {dtype_name(dtype)}"
                                f"{list(shape)}, the fragment table says {f.dtype}{list(f.shape)}")
            elif f.crc32c is not None and crcs.get(f.key) != f.crc32c:
                self.report.add("checksum", where, f"CRC32C {crcs.get(f.key, 0):#010x} differs "
                                f"from the recorded {f.crc32c:#010x} (the tensor is corrupt)")
        for key in sorted(set(entries) - {f.key for f in index.fragments}):
            self.report.add("structure", f"{self.sd}/{name}[{key}]", "in the file, but in no "
                            "fragment record")

    # -- coverage --------------------------------------------------------------------------------
    def _fragments(self, indexes: Mapping[int, RankIndex]) -> dict[tuple[str, str], list[_Held]]:
        """(canonical name, state) -> the fragments saved for it, by rank."""
        from ucp.native._source import _MODEL_KEYS, _OPTIM_KEYS, _tensor_leaves

        table: dict[tuple[str, str], list[_Held]] = {}
        for rank, index in sorted(indexes.items()):
            by_key = {f.key: f for f in index.fragments}
            tree = index.tree if isinstance(index.tree, dict) else {}
            model = next((k for k in _MODEL_KEYS if k in tree), None)
            optim = next((k for k in _OPTIM_KEYS if k in tree), None)
            leaves: list[tuple[str, str, str]] = []
            if model is None:
                leaves += [(".".join(map(str, p)), "param", k) for p, k in _tensor_leaves(tree, ())]
            else:
                leaves += [(".".join(map(str, p)), "param", k)
                           for p, k in _tensor_leaves(tree[model], ())]
                state = tree[optim].get("state") if optim and isinstance(tree[optim], dict) else None
                if isinstance(state, dict) and "@d" not in state:
                    for fqn, states in state.items():
                        leaves += [(fqn, ".".join(map(str, s)), k)
                                   for s, k in _tensor_leaves(states, ())]
            for local, state, key in leaves:
                frag = by_key.get(key)
                if frag is None:
                    self.report.add("structure", f"{self.sd}/{rank_stem(rank)}.json", f"the state "
                                    f"names tensor {key!r}, which has no fragment record")
                    continue
                name = self._canonical(local, rank, frag)
                if name is not None:
                    table.setdefault((name, state), []).append(_Held(rank, frag))
        return table

    def _canonical(self, local: str, rank: int, frag: TensorFragment) -> str | None:
        if self.spec is None or frag.placements is not None or self.topology is None:
            return local
        try:
            return self.spec.canonical_name(local, self.topology, rank)
        except UcpSpecError as e:
            self.report.add("spec", f"rank {rank}: {local}", _one_line(e))
            return None

    def _coverage(self, name: str, state: str, held: list[_Held]) -> tuple[int, ...] | None:
        """Checks that ``held`` covers the tensor exactly once; returns its canonical shape."""
        where = f"{name} ({state})"
        dtensor = [h for h in held if h.frag.placements is not None]
        if dtensor and len(dtensor) != len(held):
            self.report.add("coverage", where, "saved as a DTensor on some ranks and as a plain "
                            "tensor on others")
            return None
        if dtensor:
            _tiles(where, held, self.report)
            return held[0].frag.global_shape
        if self.spec is not None and self.topology is not None and held[0].frag.shape != ():
            return self._by_spec(name, where, held)
        self._replicas(where, held)
        return held[0].frag.shape

    def _replicas(self, where: str, held: list[_Held]) -> None:
        """Copies of a plain tensor that no spec cuts must be identical."""
        copies = {(h.frag.shape, h.frag.dtype, h.frag.crc32c) for h in held}
        if len(copies) > 1:
            ranks = sorted(h.rank for h in held)
            hint = "" if self.spec is not None else "; if it is cut over tp/pp, pass --spec"
            self.report.add("coverage", where, f"differs between ranks {ranks[:8]} (shape, dtype "
                            f"or checksum), so it is not a replica{hint}")
            return
        topo = self.topology
        if len(held) > 1 and self.spec is None and topo is not None and max(
                topo.tp, topo.pp, topo.ep, topo.sp) > 1:
            self.report.notes.append(f"{where}: identical copies on {len(held)} ranks of {topo}; "
                                     "without a spec they are taken as replicas")

    def _by_spec(self, name: str, where: str, held: list[_Held]) -> tuple[int, ...] | None:
        saved = {h.rank: h.frag for h in held}
        try:
            rule = self.spec.rule_for(name).describe()
            holders = set(self.spec.holders(name, self.topology))
        except UcpSpecError as e:
            self.report.add("spec", where, _one_line(e))
            return None
        for rank in sorted(holders - set(saved)):
            self.report.add("coverage", where, f"rank {rank} holds a piece of it under the spec "
                            f"({rule}), but saved none")
        for rank in sorted(set(saved) - holders):
            self.report.add("coverage", where, f"rank {rank} saved it, but the spec ({rule}) "
                            f"places it on ranks {sorted(holders)[:8]}")
        if holders - set(saved):
            return None
        try:
            shape = self.spec.infer_shape(name, {r: f.shape for r, f in saved.items()},
                                          self.topology)
            layout = self.spec.layout(name, shape, self.topology)
        except UcpSpecError as e:
            self.report.add("shape", where, _one_line(e))
            return None
        for rank in sorted(holders & set(saved)):
            want = layout.local_shape(rank)
            if tuple(saved[rank].shape) != want:
                self.report.add("shape", where, f"rank {rank} saved shape "
                                f"{list(saved[rank].shape)}; the spec ({rule}) gives it "
                                f"{list(want)}")
        return shape


def _tiles(where: str, held: list[_Held], report: VerifyReport) -> None:
    """A DTensor's distinct regions must tile its global shape exactly once; copies must agree."""
    gshape = held[0].frag.global_shape
    if any(h.frag.global_shape != gshape or h.frag.dtype != held[0].frag.dtype for h in held):
        report.add("coverage", where, "ranks disagree on its global shape or dtype")
        return
    regions: dict[tuple[tuple[int, ...], tuple[int, ...]], list[_Held]] = {}
    for h in held:
        regions.setdefault((h.frag.offsets, h.frag.shape), []).append(h)
    for (offsets, shape), copies in regions.items():
        if len({c.frag.crc32c for c in copies}) > 1:
            report.add("coverage", where, f"the copies of region offsets={list(offsets)} "
                       f"shape={list(shape)} on ranks {sorted(c.rank for c in copies)[:8]} differ")
    boxes = list(regions)
    volume = sum(math.prod(s) for _, s in boxes)
    for (oa, sa), (ob, sb) in itertools.combinations(boxes, 2):
        if all(a0 < b0 + bl and b0 < a0 + al for a0, al, b0, bl in zip(oa, sa, ob, sb)) and \
                math.prod(sa) and math.prod(sb):
            report.add("coverage", where, f"regions offsets={list(oa)} shape={list(sa)} and "
                       f"offsets={list(ob)} shape={list(sb)} overlap")
            return
    if volume != math.prod(gshape):
        report.add("coverage", where, f"its fragments cover {volume} of {math.prod(gshape)} "
                   f"elements of {list(gshape)}; a rank's piece is missing")


def _rep(indexes: Mapping[int, RankIndex], rank: int, what: str) -> RankIndex:
    """The index of the representative rank a member index names (a lower rank, read first)."""
    try:
        return indexes[rank]
    except KeyError:
        raise CorruptCheckpointError(f"{what}: describes its rank by rank {rank}'s index, which is "
                                     "missing or damaged (see above)") from None
