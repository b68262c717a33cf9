"""The ``ucp`` engine: ucp's own per-rank saves as a conversion source.

State layout understood (the one ``torch.distributed.checkpoint.state_dict.get_state_dict`` and
``ucp.Checkpointer`` produce)::

    {"model": {fqn: tensor}, "optim": {"state": {fqn: {"exp_avg": t, ...}},
                                        "param_groups": [{"params": [fqn, ...], "lr": ...}]}, ...}

A state without a ``model`` key is read as a flat table: every tensor is a parameter named by
its key path joined with dots. A tensor's fragments are placed by their DTensor regions; a plain
tensor saved by several ranks is replicated (the lowest rank's copy is used) unless a UCL spec
says how it is cut.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
from typing import Any, Callable, Iterator, Mapping

import torch

from ucp.core._errors import CheckpointNotFoundError, ChecksumError, ConvertError, CorruptCheckpointError, UcpSpecError
from ucp.core._fingerprint import ALGORITHM, combine, from_hex
from ucp.native._catalog import shard_owners
from ucp.native._layout import MANIFEST, newest_step, read_manifest
from ucp.native._load import read_rank_index
from ucp.native._meta import Manifest, RankIndex, TensorFragment, parse_step_dir, rank_stem, step_dir
from ucp.core._stfile import dtype_from_name, dtype_name, from_bytes, header_length, parse_header
from ucp.core._topology import Topology
from ucp.storage import Storage, checksum

from ucp.core._params import ParamInfo, Region
from ucp.resharder._read import runs
from ucp.engines._near import native_near_miss

__all__ = ["ENGINE", "NativeEngine", "NativeCheckpoint"]

#: Blocks of recently read fragments kept by a reader (each of its fragment's block size).
CACHE_BLOCKS = 16
#: The most one partial read fetches: bounds the memory of a region read, whatever the model.
PIECE_BYTES = 4 << 20
_MODEL_KEYS = ("model",)
_OPTIM_KEYS = ("optim", "optimizer")


@dataclasses.dataclass(frozen=True)
class _Frag:
    rank: int
    frag: TensorFragment


def _resolve_root(url: str, storage_options: Mapping[str, Any] | None, tag: str | None
                  ) -> tuple[Storage, int]:
    """The checkpoint root and step for ``url``, which may also name a step directory."""
    storage = Storage(url, storage_options=storage_options)
    base = url.rstrip("/").rsplit("/", 1)[-1]
    if parse_step_dir(base) is not None and storage.exists(MANIFEST):
        parent = url.rstrip("/")[: -len(base) - 1]
        return Storage(parent, storage_options=storage_options), parse_step_dir(base)
    if tag is not None:
        digits = str(tag).removeprefix("step-")
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 8):
            raise CheckpointNotFoundError(f"{url}: tag {str(tag)[:100]!r} is not a step (a number, or "
                                          "step-NNNNNNNN)")
        return storage, int(digits)
    return storage, newest_step(storage)


class NativeEngine:
    """Detects and opens ucp's native checkpoints (a root with step directories, or one step)."""

    name = "ucp"

    @property
    def reshard_target(self) -> Any:
        """ucp's native layout as a ``ucp reshard --engine ucp`` target."""
        from ucp.native._target import NativeTarget

        return NativeTarget()

    def detect(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        storage = Storage(url, storage_options=storage_options)
        # DeepSpeed writes a `latest` file too: only step directories (or a manifest) are ucp's.
        if storage.exists(MANIFEST) or any(parse_step_dir(n) is not None for n in storage.list("")):
            try:
                root, step = _resolve_root(url, storage_options, None)
                m = read_manifest(root, step)
            except Exception as e:  # noqa: BLE001 - detection reports, open raises
                return f"ucp native checkpoint (unreadable: {e})"
            layout = f"topology {m.topology}" if m.topology else "topology not recorded"
            kind = "ucp native checkpoint"
            try:
                if _snapshot_format(read_rank_index(root, m, 0)):
                    kind = "ucp native checkpoint (a DeepSpeedCheckpointer snapshot of ZeRO partitions)"
            except Exception:  # noqa: BLE001 - detection reports, open raises
                pass
            return f"{kind}: step {m.step}, {m.world_size} rank(s), {layout}"
        return None

    def near_miss(self, url: str, *, storage_options: Mapping[str, Any] | None = None) -> str | None:
        return native_near_miss(url, storage_options=storage_options)

    def open(self, url: str, *, spec: Any = None, storage_options: Mapping[str, Any] | None = None,
             tag: str | None = None) -> NativeCheckpoint:
        root, step = _resolve_root(url, storage_options, tag)
        manifest = read_manifest(root, step)
        if _snapshot_format(read_rank_index(root, manifest, 0)):
            # DeepSpeedCheckpointer's saves: ZeRO flat partitions, laid out by their own reader
            from ucp.engines.deepspeed._snapshot import DeepSpeedSnapshot

            return DeepSpeedSnapshot(root.url, step, storage_options=storage_options)  # type: ignore[return-value]
        if spec is None and manifest.spec:  # the spec given to ucp.save travels with the checkpoint
            from ucp.grammar import load_spec

            spec = load_spec(manifest.spec)
        return NativeCheckpoint(root, manifest, spec=spec)


def _snapshot_format(index: RankIndex) -> bool:
    """Whether a rank's saved tree is a ``DeepSpeedCheckpointer`` snapshot (``meta.format``)."""
    from ucp.engines.deepspeed._snapshot import FORMAT

    tree = index.tree
    meta = tree.get("meta") if isinstance(tree, dict) else None
    return isinstance(meta, dict) and meta.get("format") == FORMAT


class NativeCheckpoint:
    """One committed native step, read parameter by parameter (satisfies ``SourceCheckpoint``)."""

    engine = "ucp"
    partial_reads = True  # a region read fetches only the fragments (and blocks) that hold it

    def __init__(self, storage: Storage, manifest: Manifest, *, spec: Any = None, lazy: bool = False) -> None:
        """Opens a committed step.

        Args:
            storage / manifest: the checkpoint root and the step's manifest.
            spec: how plain (non-DTensor) tensors are cut, when they are.
            lazy: read only the rank indexes the manifest's catalog names (one per group of
                ranks that saved the same layout), and another rank's index only when reading
                its bytes, and check a file only when reading it: a resuming rank's way to
                read thousands of ranks' checkpoints. Without a catalog (manifests before
                version 2), or with ``spec``, every index is read as without it.
        """
        self.storage, self.manifest, self.spec = storage, manifest, spec
        self.step: int | None = manifest.step
        self.topology: Topology | None = manifest.topology
        self._lazy = lazy and manifest.catalog is not None and spec is None
        self._index_cache: dict[int, RankIndex] = {}
        self._keyed_cache: dict[int, dict[str, TensorFragment]] = {}
        self._index_lock = threading.Lock()
        self._params: dict[str, dict[str, list[_Frag]]] = {}
        self._groups: list[dict[str, Any]] = []
        self._group_of: dict[str, int] = {}
        self._cache: collections.OrderedDict[tuple[int, str, int], bytes] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        if self._lazy:
            ranks = [g.index for g in manifest.catalog or ()]
        else:
            self._check_files()
            ranks = list(range(manifest.world_size))
        self._scan(storage.map(self._index, ranks))

    def _index(self, rank: int) -> RankIndex:
        """The rank index of ``rank`` (read on first use)."""
        return self._cached(rank, lambda: read_rank_index(self.storage, self.manifest, rank,
                                                          rep=self._representative))

    def _representative(self, rank: int) -> RankIndex:
        """The index of a rank another rank's index names as its representative: whole, read
        once (a member of a member is refused, not followed)."""
        return self._cached(rank, lambda: read_rank_index(self.storage, self.manifest, rank, whole=True))

    def _cached(self, rank: int, read: Callable[[], RankIndex]) -> RankIndex:
        with self._index_lock:
            index = self._index_cache.get(rank)
        if index is None:
            index = read()
            with self._index_lock:
                index = self._index_cache.setdefault(rank, index)
        return index

    def _keyed(self, rank: int) -> dict[str, TensorFragment]:
        """``rank``'s fragments by key."""
        with self._index_lock:
            keyed = self._keyed_cache.get(rank)
        if keyed is None:
            keyed = {f.key: f for f in self._index(rank).fragments}
            with self._index_lock:
                keyed = self._keyed_cache.setdefault(rank, keyed)
        return keyed

    def _check_files(self) -> None:
        """Every file of the step exists with its recorded size (names the first that does not)."""
        sd = step_dir(self.manifest.step)

        def size(name: str) -> int | None:
            try:
                return self.storage.size(f"{sd}/{name}")
            except FileNotFoundError:  # a StorageError (retries exhausted) is not a missing file
                return None
        names = sorted(self.manifest.files)
        for name, got in zip(names, self.storage.map(size, names)):
            want = self.manifest.files[name].size
            if got != want:
                state = "is missing" if got is None else f"has {got} bytes, not the recorded {want}"
                raise CorruptCheckpointError(f"{self.storage.url}/{sd}/{name} {state}; restore it "
                                             "or convert another step")

    # -- building the table --------------------------------------------------------------------
    def _scan(self, indexes: list[RankIndex]) -> None:
        """The parameter table from ``indexes`` (every rank's, or, lazily, one per group)."""
        for index in indexes:
            by_key = self._keyed(index.rank)
            tree = index.tree if isinstance(index.tree, dict) else {}
            model_key = next((k for k in _MODEL_KEYS if k in tree), None)
            optim_key = next((k for k in _OPTIM_KEYS if k in tree), None)
            if model_key is None:
                for path, key in _tensor_leaves(index.tree, ()):
                    self._add(".".join(map(str, path)), "param", index.rank, by_key[key])
                continue
            for path, key in _tensor_leaves(tree[model_key], ()):
                self._add(".".join(map(str, path)), "param", index.rank, by_key[key])
            if optim_key is not None:
                self._scan_optim(tree[optim_key], index, by_key)

    def _scan_optim(self, optim: Any, index: RankIndex, by_key: Mapping[str, TensorFragment]) -> None:
        state = optim.get("state") if isinstance(optim, dict) else None
        if isinstance(state, dict) and "@d" in state:
            raise ConvertError(f"{self.storage.url}: optimizer state of rank {index.rank} is keyed "
                               "by integer indices, which do not name parameters; save it with "
                               "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict "
                               "(keys are parameter names)")
        for fqn, states in (state or {}).items():
            for sname, key in _tensor_leaves(states, ()):
                self._add(fqn, ".".join(map(str, sname)), index.rank, by_key[key])
        groups = optim.get("param_groups") if isinstance(optim, dict) else None
        if isinstance(groups, list):
            from ucp.core._tree import unflatten

            for i, g in enumerate(unflatten(groups, lambda k: None)):
                if index.rank == 0:
                    self._groups.append({k: v for k, v in g.items() if k != "params"})
                for fqn in g.get("params", []):
                    self._group_of[self._canonical(str(fqn), index.rank, None)] = i

    def _add(self, name: str, state: str, rank: int, frag: TensorFragment) -> None:
        name = self._canonical(name, rank, frag)
        self._params.setdefault(name, {}).setdefault(state, []).append(_Frag(rank, frag))

    def _canonical(self, local: str, rank: int, frag: TensorFragment | None) -> str:
        """The canonical name of what ``rank`` saved as ``local`` (the spec undoes PP renumbering
        and renames; DTensor names are canonical already)."""
        if self.spec is None or (frag is not None and frag.placements is not None):
            return local
        if self.topology is None:
            raise ConvertError(f"{self.storage.url}: a UCL spec needs the topology the checkpoint "
                               "was saved with; pass topology= to ucp.save")
        try:
            return self.spec.canonical_name(local, self.topology, rank)
        except UcpSpecError:
            if frag is None:  # a param-group entry of a DTensor parameter
                return local
            raise

    # -- SourceCheckpoint ----------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._params)

    def info(self, name: str) -> ParamInfo:
        states = self._states(name)
        if "param" not in states:
            raise ConvertError(f"{self.storage.url}: {name} has optimizer state but no model tensor")
        first = states["param"][0].frag
        # An fp32 model's weights are the fp32 state; a low-precision model keeps both.
        stored = ("fp32",) if first.dtype == "float32" else ("param", "fp32")
        return ParamInfo(shape=self._shape(name), dtype=dtype_from_name(first.dtype),
                         states=stored + tuple(s for s in states if s not in ("param", "fp32")),
                         frozen=bool(self._groups) and name not in self._group_of,
                         group=self._group_of.get(name))

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        """State ``state`` of ``name``; with ``region``, only that box, reading only the
        fragments, and the blocks of them, that overlap it."""
        stored, frags = self._frags(name, state)
        if region is None:
            t = self._assemble(name, stored, frags)
        else:
            t = torch.empty([hi - lo for lo, hi in region], dtype=dtype_from_name(frags[0].frag.dtype))
            for sub, piece in self.iter_region(name, state, region):
                t[tuple(slice(a - r0, b - r0) for (a, b), (r0, _) in zip(sub, region))] = piece
        return t.float() if stored != state else t

    def recorded_fingerprint(self, name: str, state: str | None) -> int | None:
        """The fingerprint of ``read(name, state)``'s values from the partial fingerprints its
        fragments recorded when saved (:mod:`ucp.core._fingerprint`), or None: a fragment records
        none (saved by an older ucp) or another algorithm's, the fragments are not regions of the
        global tensor (plain tensors that a spec cuts), or the read casts the stored values
        (``state=None``, a buffer: None)."""
        if state is None:
            return None
        try:
            stored, frags = self._frags(name, state)
        except KeyError:
            return None
        first = frags[0].frag
        if stored != state and first.dtype != "float32":  # read() casts to fp32
            return None
        if first.placements is None:
            if (self.spec is not None and first.shape != ()) or first.shape != first.global_shape:
                return None
            owners = [frags[0]]  # what read() reads (replicas are checked equal there)
        elif any(p.startswith("P(") for p in first.placements):
            return None
        else:
            owners = self._owners(name, stored, frags)
        prints = [f.frag.fingerprint for f in owners]
        if not all(p is not None and p.startswith(f"{ALGORITHM}:") for p in prints):
            return None
        return combine(from_hex(p.partition(":")[2]) for p in prints)  # type: ignore[union-attr]

    def iter_region(self, name: str, state: str, region: Region) -> Iterator[tuple[Region, torch.Tensor]]:
        """``region`` of a state in pieces ``(global sub-box, values)`` that tile it, each read
        from one fragment, at most ``PIECE_BYTES`` at a time. Pieces are in the stored dtype and
        may view a buffer that the next one reuses: copy each out before asking for the next."""
        stored, frags = self._frags(name, state)
        first = frags[0].frag
        if first.placements is None and self.spec is not None and first.shape != ():
            whole = self._assemble(name, stored, frags)  # spec-cut plain tensors: consolidated first
            yield region, whole[tuple(slice(a, b) for a, b in region)]
            return
        covered = 0
        for f in self._owners(name, stored, frags, region):
            inter = tuple((max(lo, o), min(hi, o + n)) for (lo, hi), o, n in
                          zip(region, f.frag.offsets, f.frag.shape))
            if any(a >= b for a, b in inter):
                continue
            covered += math.prod(b - a for a, b in inter)
            for box in _pieces(inter, dtype_from_name(f.frag.dtype).itemsize):
                local = tuple((a - o, b - o) for (a, b), o in zip(box, f.frag.offsets))
                yield box, self._read_part(f, local)
        if covered < math.prod(b - a for a, b in region):
            raise ConvertError(f"{self.storage.url}: the fragments of {name} ({stored}) do not cover "
                               f"{[list(r) for r in region]}; a rank's file is missing")

    def _frags(self, name: str, state: str) -> tuple[str, list[_Frag]]:
        """The stored state that holds ``state`` (an fp32 model's ``fp32`` is its ``param``),
        and its fragments."""
        states = self._states(name)
        if state == "fp32" and "fp32" not in states:
            state = "param"
        if state not in states:
            raise KeyError(f"parameter {name!r} has no state {state!r} in {self.storage.url}; "
                           f"it has {sorted(states)}")
        return state, states[state]

    def _owners(self, name: str, state: str, frags: list[_Frag],
                region: Region | None = None) -> list[_Frag]:
        """One fragment per distinct region (replicas are read once: the lowest rank's); lazily,
        only those that overlap ``region``."""
        first = frags[0].frag
        if first.placements is None:
            if not self._lazy:  # lazily, the other copies' records are never read
                self._check_replicas(name, state, frags)
            return [frags[0]]
        if any(p.startswith("P(") for p in first.placements):
            raise ConvertError(f"{name} ({state}) is a Partial DTensor (pending reduction); reduce "
                               "it (e.g. .redistribute to Replicate) before saving")
        if self._lazy:
            return self._lazy_owners(name, state, frags, region)
        self._check_regions(name, state, frags)
        seen: dict[tuple[Any, ...], _Frag] = {}
        for f in frags:
            seen.setdefault((f.frag.offsets, f.frag.shape), f)
        return list(seen.values())

    def _lazy_owners(self, name: str, state: str, reps: list[_Frag],
                     region: Region | None) -> list[_Frag]:
        """The fragments of a DTensor state that hold ``region`` (None: all), one per distinct
        region: where they are follows from the representatives' placements and meshes; only
        the ranks chosen have their index read, and each record must agree."""
        chosen: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, str]] = {}
        for rep in reps:
            mesh = self._index(rep.rank).meshes[rep.frag.mesh]
            for rank, offsets, shape in shard_owners(rep.frag, mesh):
                if region is None or all(lo < o + n and o < hi
                                         for (lo, hi), o, n in zip(region, offsets, shape)):
                    chosen.setdefault((offsets, shape), (rank, rep.frag.key))
        out = []
        for (offsets, shape), (rank, key) in chosen.items():
            f = self.fragment(rank, key)
            if (f.offsets, f.shape) != (offsets, shape):
                raise CorruptCheckpointError(
                    f"{self.storage.url}: rank {rank} records {key!r} at offsets {list(f.offsets)} shape "
                    f"{list(f.shape)}, but its placements put it at {list(offsets)} {list(shape)}; the "
                    "step is inconsistent (convert it, which reads every rank's record)")
            out.append(_Frag(rank, f))
        self._check_regions(name, state, out, whole=region is None)
        return out

    def buffers(self) -> dict[str, torch.Tensor]:
        """Always empty: a state dict does not tell buffers from frozen parameters, so every
        model tensor is a parameter (``frozen`` when no optimizer group lists it)."""
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        return [dict(g) for g in self._groups]

    def tree(self, rank: int) -> Any:
        """The structure ``rank`` saved (JSON; each tensor is ``{"@t": key}``); reads no data."""
        return self._index(rank).tree

    def fragment(self, rank: int, key: str) -> TensorFragment:
        """The record of tensor ``key`` of ``rank`` (dtype, shape, checksums)."""
        try:
            return self._keyed(rank)[key]
        except KeyError:
            raise CorruptCheckpointError(f"{self.storage.url}: rank {rank} saved no tensor {key!r}; "
                                         "the step is inconsistent") from None

    def read_saved(self, rank: int, key: str, region: Region | None = None) -> torch.Tensor:
        """Tensor ``key`` as ``rank`` saved it (``region``: only that box of it, reading only the
        blocks that hold it), verified against its checksums."""
        f = _Frag(rank, self.fragment(rank, key))
        if region is None:
            return self._read_fragment(f)
        return self._read_part(f, region)

    def read_subtree(self, rank: int, key: str) -> Any:
        """``state[key]`` as ``rank`` saved it (reading only its tensors), or None if absent."""
        from ucp.core._tree import unflatten

        index = self._index(rank)
        tree = index.tree.get(key) if isinstance(index.tree, dict) else None
        if tree is None:
            return None
        frags = {f.key: f for f in index.fragments}
        return unflatten(tree, lambda k: self._read_fragment(_Frag(rank, frags[k])))

    # -- assembly ------------------------------------------------------------------------------
    def _states(self, name: str) -> dict[str, list[_Frag]]:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter {name!r} in {self.storage.url}") from None

    def _shape(self, name: str) -> tuple[int, ...]:
        """The canonical shape: recorded for DTensors, inferred through the spec otherwise."""
        frags = self._states(name)["param"]
        if frags[0].frag.placements is not None or self.spec is None:
            return frags[0].frag.global_shape
        return self.spec.infer_shape(name, {f.rank: f.frag.shape for f in frags}, self.topology)

    def _assemble(self, name: str, state: str, frags: list[_Frag]) -> torch.Tensor:
        first = frags[0].frag
        if first.placements is None and self.spec is not None and first.shape != ():
            return self._consolidate_by_spec(name, state, frags)
        if first.placements is None:
            self._check_replicas(name, state, frags)
            return self._read_fragment(frags[0])
        if any(p.startswith("P(") for p in first.placements):
            raise ConvertError(f"{name} ({state}) is a Partial DTensor (pending reduction); reduce "
                               "it (e.g. .redistribute to Replicate) before saving")
        frags = self._owners(name, state, frags)  # checked before allocating what the records claim
        out = torch.empty(first.global_shape, dtype=dtype_from_name(first.dtype))
        covered = torch.zeros(first.global_shape, dtype=torch.bool)
        done: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        for f in frags:
            region = (f.frag.offsets, f.frag.shape)
            if region in done:  # a replica of a region already placed
                continue
            done.add(region)
            index = tuple(slice(o, o + s) for o, s in zip(*region))
            out[index] = self._read_fragment(f)
            covered[index] = True
        if not bool(covered.all()):
            raise ConvertError(f"{self.storage.url}: the fragments of {name} ({state}) do not cover "
                               f"its global shape {list(first.global_shape)}; a rank's file is missing")
        return out

    def _check_replicas(self, name: str, state: str, frags: list[_Frag]) -> None:
        """Copies of a plain tensor on several ranks that no spec cuts must be true replicas
        (same shape and checksum); otherwise it is sharded and needs a spec."""
        differ = {(f.frag.shape, f.frag.crc32c) for f in frags}
        if len(differ) > 1:
            raise ConvertError(f"{self.storage.url}: {name} ({state}) differs between ranks "
                               f"{sorted(f.rank for f in frags)[:8]} (shape or checksum), so it is "
                               "sharded, not replicated, and carries no DTensor placements; pass a "
                               "UCL spec (--spec)")

    def _consolidate_by_spec(self, name: str, state: str, frags: list[_Frag]) -> torch.Tensor:
        layout = self.spec.layout(name, self._shape(name), self.topology)
        by_rank = {f.rank: f for f in frags}
        missing = [r for r in layout.needed() if r not in by_rank]
        if missing:
            raise ConvertError(f"{self.storage.url}: {name} ({state}) needs the fragments of ranks "
                               f"{missing}, which did not save it ({layout.rule})")
        pieces = {r: self._read_fragment(by_rank[r]) for r in layout.needed()}
        return self.spec.consolidate(name, pieces, self.topology, global_shape=layout.global_shape)

    def _check_regions(self, name: str, state: str, frags: list[_Frag], *, whole: bool = True) -> None:
        """The DTensor fragments of one state: records that agree with each other and with the
        shard headers, and (``whole``: all of them) regions whose sizes add up to at least the
        global shape. A damaged or hostile rank index then cannot make the converter allocate
        more than the shards hold."""
        first = frags[0].frag
        for f in frags:
            self._entry(f)
            if (f.frag.global_shape, f.frag.dtype) != (first.global_shape, first.dtype):
                raise CorruptCheckpointError(f"{self.storage.url}: rank {f.rank} records {name} ({state}) as "
                                             f"{f.frag.dtype}{list(f.frag.global_shape)}, rank {frags[0].rank} as "
                                             f"{first.dtype}{list(first.global_shape)}; the step is inconsistent")
        regions = {(f.frag.offsets, f.frag.shape) for f in frags}
        if whole and sum(math.prod(s) for _, s in regions) < math.prod(first.global_shape):
            raise ConvertError(f"{self.storage.url}: the fragments of {name} ({state}) do not cover "
                               f"its global shape {list(first.global_shape)}; a rank's file is missing")

    def _entry(self, f: _Frag) -> tuple[Any, ...]:
        """The shard header entry of a fragment, checked against its record."""
        rel = f"{step_dir(self.manifest.step)}/{rank_stem(f.rank)}.safetensors"
        base, entries = self._header(f.rank)
        try:
            dtype, shape, start, stop = entries[f.frag.key]
        except KeyError:
            raise CorruptCheckpointError(f"{self.storage.url}/{rel}: no tensor {f.frag.key!r}") from None
        if tuple(shape) != f.frag.shape or dtype_name(dtype) != f.frag.dtype:
            raise CorruptCheckpointError(f"{self.storage.url}/{rel}: tensor {f.frag.key!r} is "
                                         f"{dtype_name(dtype)}{list(shape)}, its fragment record says "
                                         f"{f.frag.dtype}{list(f.frag.shape)}; the step is inconsistent")
        return rel, base, dtype, shape, start, stop

    def _read_into(self, rel: str, start: int, out: memoryview) -> int:
        """Bytes from ``start`` of ``rel`` into ``out`` (see ``Storage.read_range_into``)."""
        try:
            return self.storage.read_range_into(rel, start, out)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(
                f"{self.storage.url}/{rel}: gone while being read (deleted by the retention, keep=N, "
                "of a job still saving into this root?); read a step the job keeps, or copy the "
                "step elsewhere first") from e

    def _read_range(self, rel: str, start: int, stop: int) -> bytes:
        out = bytearray(stop - start)
        return bytes(out[:self._read_into(rel, start, memoryview(out))])

    def _read_part(self, f: _Frag, box: Region) -> torch.Tensor:
        """``box`` (fragment-local) of a fragment: the blocks that hold it, each verified against
        its CRC32C (the whole fragment when it has no block checksums: small, or saved by an
        older ucp). A fresh tensor or a view into a fresh buffer."""
        rel, base, dtype, shape, start, stop = self._entry(f)
        blocks, bb = f.frag.block_crc32c, f.frag.block_bytes
        if blocks is None or all(a == 0 and b == n for (a, b), n in zip(box, shape)):
            return self._read_fragment(f)[tuple(slice(a, b) for a, b in box)]
        nbytes, item = stop - start, dtype.itemsize
        if len(blocks) != -(-nbytes // bb):
            raise CorruptCheckpointError(f"{self.storage.url}/{rel}: tensor {f.frag.key!r} has "
                                         f"{len(blocks)} block checksums for {nbytes} bytes; the "
                                         "step is inconsistent")
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        first = sum(a * s for (a, _), s in zip(box, strides))
        last = sum((b - 1) * s for (_, b), s in zip(box, strides)) + 1
        b0, b1 = first * item // bb, -(-last * item // bb)
        buf = self._blocks(f, rel, base + start, nbytes, b0, b1)
        flat = from_bytes(buf, dtype, (len(buf) // item,))
        return flat.as_strided([b - a for a, b in box], strides, first - b0 * bb // item)

    def _blocks(self, f: _Frag, rel: str, origin: int, nbytes: int, b0: int, b1: int) -> bytearray:
        """Blocks ``[b0, b1)`` of a fragment (which starts at byte ``origin`` of ``rel``), each
        checked against its CRC32C, read straight into the returned buffer. The first and last
        block of each read are kept for a while, so a neighbouring read (the next parameter of a
        flat ZeRO partition, the next rows of a shard) does not fetch them again."""
        bb = f.frag.block_bytes
        out = bytearray(min(b1 * bb, nbytes) - b0 * bb)
        view, missing = memoryview(out), []
        for i in range(b0, b1):
            with self._cache_lock:
                hit = self._cache.get((f.rank, f.frag.key, i))
                if hit is not None:
                    self._cache.move_to_end((f.rank, f.frag.key, i))
            if hit is None:
                missing.append(i)
            else:
                view[(i - b0) * bb:(i - b0) * bb + len(hit)] = hit
        for lo, hi in runs(missing):
            part = view[(lo - b0) * bb:min(hi * bb, nbytes) - b0 * bb]
            got = self._read_into(rel, origin + lo * bb, part)
            for i in range(lo, hi):
                block = part[(i - lo) * bb:(i - lo + 1) * bb]
                end = min((i - lo + 1) * bb, got)
                if end - (i - lo) * bb != block.nbytes or checksum([block])[0] != f.frag.block_crc32c[i]:
                    raise ChecksumError(f"{self.storage.url}/{rel}: tensor {f.frag.key!r} fails the "
                                        f"CRC32C of its block {i} (the file is corrupt)")
            with self._cache_lock:
                for i in {lo, hi - 1}:
                    self._cache[(f.rank, f.frag.key, i)] = bytes(part[(i - lo) * bb:(i - lo + 1) * bb])
                while len(self._cache) > CACHE_BLOCKS:
                    self._cache.popitem(last=False)
        return out

    def _read_fragment(self, f: _Frag) -> torch.Tensor:
        rel, base, dtype, shape, start, stop = self._entry(f)
        buf = bytearray(stop - start)
        got = self._read_into(rel, base + start, memoryview(buf))
        if got != len(buf) or (f.frag.crc32c is not None and checksum([buf])[0] != f.frag.crc32c):
            raise ChecksumError(f"{self.storage.url}/{rel}: tensor {f.frag.key!r} fails its CRC32C "
                                "check (the file is corrupt)")
        return from_bytes(buf, dtype, shape)

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one header per rank file, kept for the object's life
    def _header(self, rank: int) -> tuple[int, dict[str, Any]]:
        rel = f"{step_dir(self.manifest.step)}/{rank_stem(rank)}.safetensors"
        where = f"{self.storage.url}/{rel}"
        size = self.manifest.files[f"{rank_stem(rank)}.safetensors"].size
        n = header_length(self._read_range(rel, 0, 8), where=where, size=size)
        raw = self._read_range(rel, 8, 8 + n)
        return 8 + n, parse_header(raw, where=where, data_size=size - 8 - n)


def _pieces(box: Region, itemsize: int) -> Iterator[Region]:
    """``box`` cut along dim 0 into boxes of at most ``PIECE_BYTES`` (one row at least)."""
    if not box:
        yield box
        return
    row = math.prod(b - a for a, b in box[1:]) * itemsize
    step = max(1, PIECE_BYTES // max(row, 1))
    (lo, hi), rest = box[0], box[1:]
    for a in range(lo, hi, step):
        yield ((a, min(hi, a + step)),) + rest


def _tensor_leaves(tree: Any, path: tuple[Any, ...]) -> Iterator[tuple[tuple[Any, ...], str]]:
    """(key path, tensor key) of every tensor in a saved structure."""
    if isinstance(tree, dict):
        if set(tree) == {"@t"}:
            yield path, tree["@t"]
        elif set(tree) == {"@d"}:
            for k, v in tree["@d"]:
                yield from _tensor_leaves(v, path + (k,))
        elif set(tree) == {"@tuple"}:
            for i, v in enumerate(tree["@tuple"]):
                yield from _tensor_leaves(v, path + (i,))
        else:
            for k, v in tree.items():
                yield from _tensor_leaves(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _tensor_leaves(v, path + (i,))


ENGINE = NativeEngine()
