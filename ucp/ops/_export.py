"""``ucp export``: any checkpoint ucp reads -> Hugging Face safetensors, one tensor at a time.

Output, as ``transformers``' ``save_pretrained`` lays it out::

    DST/model.safetensors                         when everything fits in one shard
    DST/model-00001-of-00003.safetensors ...      otherwise, and
    DST/model.safetensors.index.json              {"metadata": {"total_size": N}, "weight_map": {...}}

Shards are planned from the metadata before anything is read (so the file names know their
count); each shard's header is written first and then each tensor's bytes, one tensor in memory
at a time. Every shard is written under a temporary name first; only when all are written is
an earlier export replaced (its index removed, the new shards renamed into place, its other
shards removed), and the index comes last. So a reader never mixes two exports, an export that
fails (a full disk) leaves the earlier one whole, and readers refuse an incomplete set of
``model-XXXXX-of-NNNNN`` shards.

Names go through the spec's renames: a parameter stored under an engine name (a rule's
``engine "..."`` pattern or a stage alias) is exported under the rule's canonical name, laid out
canonically (transposes undone, vocabulary padding stripped). Names a spec does not rename are
exported as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import struct
import sys
import uuid
from typing import Any, BinaryIO, Iterator, Mapping

import torch

from ucp.storage import Storage

from ucp.ops._dest import check_destination, refuse_foreign
from ucp.core._errors import CheckpointExistsError, ConvertError, StorageError, UcpSpecError, VerificationError
from ucp.core._fingerprint import fingerprint, to_hex
from ucp.ops._inspect import INDEX, Opened, display_url, open_checkpoint, parse_size
from ucp.core._stfile import _ST_DTYPES, tensor_bytes
from ucp.core._topology import Topology

__all__ = ["DTYPES", "ExportResult", "export_hf"]

log = logging.getLogger("ucp")
#: ``--dtype`` values and the torch dtype each exports as.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
SINGLE = "model.safetensors"
_ONE = Topology()  # a whole tensor: the layout of a checkpoint converted without a spec


@dataclasses.dataclass(frozen=True)
class _Item:
    """One tensor to export: where it comes from and what it becomes."""

    out: str
    src: str
    kind: str  # "param" or "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    renamed: bool

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What :func:`export_hf` wrote: the files (relative to ``url``), tensors and bytes."""

    url: str
    files: tuple[str, ...]
    tensors: int
    total_size: int
    renamed: int


def export_hf(src: str, dst: str, *, dtype: str | torch.dtype | None = None,
              max_shard_size: str | int = "5GB", spec: Any = None, engine: str = "auto",
              tag: str | None = None, config: str | os.PathLike[str] | None = None,
              overwrite: bool = False, verify: bool = True,
              storage_options: Mapping[str, Any] | None = None,
              dst_storage_options: Mapping[str, Any] | None = None,
              progress: bool | None = None, hf_map: str | None = None) -> ExportResult:
    """Writes the model weights of ``src`` as Hugging Face safetensors under ``dst``.

    Args:
        src: a universal checkpoint, or anything ``ucp.convert`` reads (native, DCP, DeepSpeed),
            or safetensors.
        dst: output directory (local path or fsspec URL).
        dtype: ``bf16``, ``fp16`` or ``fp32`` for every floating-point tensor; default: each
            parameter's model dtype. fp32 is taken from the fp32 master weights when saved.
        max_shard_size: largest shard, e.g. ``"5GB"`` (10**9 bytes) or ``"2GiB"``; a tensor
            larger than this gets a shard of its own.
        spec: UCL spec whose renames map names (default: the one stored in the checkpoint).
        engine, tag: as ``ucp convert`` (format and step/tag of ``src``).
        config: a ``config.json`` to copy into ``dst`` (so ``from_pretrained`` can load it).
        overwrite: replace an earlier export in ``dst``.
        verify: check each tensor as written against the fingerprint recorded in a universal
            ``src`` (tensors exported under their own name, in their stored dtype).
        storage_options / dst_storage_options: fsspec options of ``src`` / ``dst``; never shown.
        progress: progress bar on stderr (default: when stderr is a terminal).
        hf_map: a bundled map to Hugging Face names and layouts (``megatron-llama``: one Megatron
            tensor may give several; ``torchtitan-llama``: query and key rows reordered per head);
            needs ``config`` (the head counts). Default: names as stored.

    Returns:
        An :class:`ExportResult`.

    Raises:
        CheckpointExistsError: ``dst`` holds an export and ``overwrite`` is False.
        ConvertError: two tensors map to one name, or a tensor does not fit its spec rule.
        VerificationError: a tensor as written differs from the one recorded in ``src``.
        ValueError: a bad ``dtype`` or ``max_shard_size``.

    Example:
        >>> export_hf("universal/", "hf/", dtype="bf16", max_shard_size="2GB")
    """
    check_destination(src, dst)
    target = _dtype(dtype)
    limit = parse_size(max_shard_size)
    if limit <= 0:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size!r}")
    opened = open_checkpoint(src, engine=engine, spec=spec, tag=tag, storage_options=storage_options)
    if hf_map is not None:
        opened = _mapped(opened, hf_map, config)
    items = _plan(opened, target)
    shards = _shard(items, limit)
    refuse_foreign(dst, ours=_exported, what="a Hugging Face export", storage_options=dst_storage_options)
    out = Storage(dst, storage_options=dst_storage_options)
    old = _earlier_export(out, overwrite=overwrite, url=dst)
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    from tqdm import tqdm

    bar = tqdm(total=sum(i.nbytes for i in items), unit="B", unit_scale=True, desc="export",
               file=sys.stderr, disable=not (sys.stderr.isatty() if progress is None else progress))
    staged: dict[str, str] = {}
    try:
        for name, shard in zip(names, shards):
            staged[name] = _write_shard(out, name, shard, opened, bar, url=dst, verify=verify)
    except BaseException:
        for tmp in staged.values():  # the earlier export stays as it was
            _remove(out, tmp)
        raise
    finally:
        bar.close()
    _publish(out, staged, old=old)
    if config is not None:
        with open(config, "rb") as f:
            out.write("config.json", f.read())
    total = sum(i.nbytes for i in items)
    if len(shards) > 1:  # written last: the index makes the shards one checkpoint
        index = {"metadata": {"total_size": total},
                 "weight_map": {i.out: n for n, shard in zip(names, shards) for i in shard}}
        out.write(INDEX, json.dumps(index, indent=2, sort_keys=False).encode() + b"\n")
    renamed = sum(i.renamed for i in items)
    log.debug("exported %d tensors (%d renamed) to %s", len(items), renamed, display_url(dst))
    files = tuple(names + ([INDEX] if len(shards) > 1 else []) + (["config.json"] if config else []))
    return ExportResult(url=dst, files=files, tensors=len(items), total_size=total, renamed=renamed)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not one of bf16, fp16, fp32") from None


def _mapped(opened: Opened, name: str, config: str | os.PathLike[str] | None) -> Opened:
    """``opened`` under a bundled map's Hugging Face names (what it reads is re-laid out, so the
    recorded fingerprints do not apply: the view is not ``universal``)."""
    from ucp.engines.megatron import MAPS, HfView

    if name not in MAPS:
        raise ConvertError(f"no Hugging Face map {name!r}; the bundled maps are {', '.join(sorted(MAPS))}")
    if config is None:
        raise ConvertError(f"--map {name} needs --config: the Hugging Face config.json gives the head "
                           "counts that split the fused tensors and order the rotary rows")
    try:
        with open(config, "rb") as f:
            settings = json.loads(f.read())
    except ValueError as e:
        raise ConvertError(f"{config}: not JSON ({e}); --config takes the model's config.json") from e
    if not isinstance(settings, dict):
        raise ConvertError(f"{config}: holds a {type(settings).__name__}, not a config object")
    return Opened(format=f"{opened.format}, mapped by {name}", url=opened.url, engine=opened.engine,
                  step=opened.step, topology=opened.topology, description=opened.description,
                  source=HfView(opened, MAPS[name](settings)))


# -- planning -------------------------------------------------------------------------------------

def _plan(opened: Opened, target: torch.dtype | None) -> list[_Item]:
    """Every tensor to export with its output name, shape and dtype (metadata only)."""
    items: list[_Item] = []
    for name in opened.names():
        info = opened.info(name)
        out, shape = _rename(opened.spec, name, tuple(info.shape))
        dtype = target if target is not None and info.dtype.is_floating_point else info.dtype
        items.append(_Item(out, name, "param", shape, dtype, out != name))
    for name in opened.buffer_names():
        shape, bdtype = opened.buffer_info(name)
        out, shape = _rename(opened.spec, name, tuple(shape))
        dtype = target if target is not None and bdtype.is_floating_point else bdtype
        items.append(_Item(out, name, "buffer", shape, dtype, out != name))
    seen: dict[str, str] = {}
    for item in items:
        if item.out in seen:
            raise ConvertError(f"{item.src!r} and {seen[item.out]!r} are both exported as "
                               f"{item.out!r}; fix the spec's renames")
        seen[item.out] = item.src
        if item.dtype not in _ST_DTYPES:
            raise ConvertError(f"{item.src!r} has dtype {item.dtype}, which safetensors cannot hold")
    return items


def _rename(spec: Any, name: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The canonical name and shape of ``name`` if the spec renames it, else ``name`` as is."""
    if spec is None:
        return name, shape
    try:
        canonical = spec.canonical_name(name, _ONE, 0)
    except UcpSpecError:
        return name, shape  # already canonical, or a name the spec does not cover
    if canonical == name:
        return name, shape
    try:
        return canonical, tuple(spec.infer_shape(canonical, {0: shape}, _ONE))
    except UcpSpecError as e:
        raise ConvertError(f"{name!r} (exported as {canonical!r}): {e}") from e


def _shard(items: list[_Item], limit: int) -> list[list[_Item]]:
    """Greedy, in order: a shard closes when the next tensor would take it past ``limit``."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


# -- writing --------------------------------------------------------------------------------------

def _exported(name: str) -> bool:
    """Whether an entry of the destination is one an export writes (or replaces)."""
    return name in (INDEX, "config.json") or (name.startswith("model") and name.endswith(".safetensors"))


def _earlier_export(out: Storage, *, overwrite: bool, url: str) -> list[str]:
    """The files of an earlier export in ``out`` (replaced only with ``overwrite``)."""
    old = [n for n in out.list("") if n != "config.json" and _exported(n)]
    if old and not overwrite:
        raise CheckpointExistsError(f"{display_url(url)} already holds an export ({old[0]}, ...); "
                                    "pass --overwrite to replace it, or choose another directory")
    return old


def _publish(out: Storage, staged: Mapping[str, str], *, old: list[str]) -> None:
    """Swaps the finished shards in for an earlier export: its index first (it must never name
    the new shards), then each shard by rename, then its shards the new export does not reuse.
    Only now is the earlier export gone: a new one that did not fit left it whole."""
    if INDEX in old:
        out.delete(INDEX)
    for name, tmp in staged.items():
        if out.is_local:
            os.replace(tmp, out.path(name))
        else:
            out.fs.mv(tmp, out.path(name))
    for name in old:
        if name != INDEX and name not in staged:
            out.delete(name)


def _remove(out: Storage, path: str) -> None:
    with contextlib.suppress(OSError, FileNotFoundError):
        out.fs.rm(path)


def _state(opened: Opened, item: _Item) -> str | None:
    """The state an item is read from (None: a buffer)."""
    if item.kind == "buffer":
        return None
    info = opened.info(item.src)
    wants_fp32 = item.dtype == torch.float32 and info.dtype != torch.float32
    return "fp32" if wants_fp32 and "fp32" in info.states else "param"


def _read(opened: Opened, item: _Item) -> torch.Tensor:
    """One tensor in its exported name's layout and dtype."""
    state = _state(opened, item)
    t = opened.read_buffer(item.src) if state is None else opened.read(item.src, state)
    if item.renamed:
        t = opened.spec.consolidate(item.out, {0: t}, _ONE, global_shape=item.shape)
    t = t.to(item.dtype) if t.dtype != item.dtype else t
    if tuple(t.shape) != item.shape:
        raise ConvertError(f"{item.src!r} reads as shape {list(t.shape)}, but its metadata says "
                           f"{list(item.shape)}; the checkpoint is inconsistent (run ucp verify)")
    return t.contiguous()


def _header(shard: list[_Item]) -> tuple[bytes, list[_Item]]:
    """The safetensors header of ``shard`` and the order its tensors are written in (largest item
    size first, so every tensor starts aligned to its item size)."""
    order = sorted(shard, key=lambda i: -torch.empty((), dtype=i.dtype).element_size())
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in order:
        header[item.out] = {"dtype": _ST_DTYPES[item.dtype], "shape": list(item.shape),
                            "data_offsets": [offset, offset + item.nbytes]}
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def _write_shard(out: Storage, name: str, shard: list[_Item], opened: Opened, bar: Any, *,
                 url: str, verify: bool) -> str:
    """Writes one shard under a temporary name beside ``name``; returns that name.

    Raises:
        StorageError: the write failed (a full disk...), naming the file.
        VerificationError: (``verify``) a tensor differs from its source's fingerprint.
    """
    head, order = _header(shard)
    tmp = f"{out.path(name)}.partial-{uuid.uuid4().hex[:12]}"
    try:
        with _new_file(out, tmp) as f:
            f.write(head)
            for item in order:
                t = _read(opened, item)
                if verify:  # ``t`` is what is written: tensor_bytes is a view of its memory
                    _check(opened, item, t, f"{display_url(out.url)}/{name}")
                f.write(tensor_bytes(t) if t.numel() else b"")
                bar.update(item.nbytes)
                del t
    except OSError as e:
        raise StorageError(f"writing {display_url(url)}/{name} failed: {e}; free space (the shard "
                           f"needs {sum(i.nbytes for i in shard)} bytes) or export elsewhere") from e
    return tmp


def _check(opened: Opened, item: _Item, t: torch.Tensor, where: str) -> None:
    """The tensor about to be written, fingerprinted, against the fingerprint a universal source
    recorded for it, or a native one's fragments did (only a tensor exported as stored: same
    name, layout and dtype)."""
    if opened.format not in ("universal", "ucp") or item.renamed:
        return
    state = _state(opened, item)
    stored = opened.info(item.src).dtype if state == "param" else torch.float32
    if state is not None and item.dtype != stored:
        return
    if state is None and opened.buffer_info(item.src)[1] != item.dtype:
        return
    recorded = getattr(opened.source, "recorded_fingerprint", None)
    want = None if recorded is None else recorded(item.src, state)
    if want is None:
        return
    got = fingerprint(t)
    if got != want:
        what = f"state {state!r}" if state is not None else "buffer"
        raise VerificationError(f"{item.src}: {what} as exported to {where} (as {item.out!r}) differs from "
                                f"the checkpoint (fingerprint {to_hex(got)}, recorded {to_hex(want)}); do "
                                "not use this export, and report the bug")


@contextlib.contextmanager
def _new_file(out: Storage, tmp: str) -> Iterator[BinaryIO]:
    """A new file at ``tmp``, durable when the block ends; removed if the block fails."""
    try:
        if out.is_local:
            os.makedirs(os.path.dirname(tmp), exist_ok=True)
            with open(tmp, "xb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
        else:
            with out.fs.open(tmp, "wb") as f:
                yield f
    except BaseException:
        _remove(out, tmp)
        raise
