"""Megatron-core torch_dist as a reshard target (``ucp reshard SRC DST --engine megatron``).

Writes a Megatron-LM save root that Megatron-core's own ``dist_checkpointing.load`` reads at the
requested tp/pp::

    DST/latest_checkpointed_iteration.txt        the step
    DST/iter_NNNNNNN/metadata.json               {"sharded_backend": "torch_dist", ...}
    DST/iter_NNNNNNN/.metadata, __0_0.distcp     torch DCP, written by torch's own writer

The keys are Megatron's ``sharded_state_dict`` keys: a transformer layer's tensors stacked along a
leading layer axis (``decoder.layers.self_attention.linear_qkv.weight`` of shape ``[layers, ...]``),
each layer one chunk, as Megatron saves them; the distributed optimizer's states, where the source
has them, in its ``fully_reshardable`` layout (``optimizer.state.<param|exp_avg|exp_avg_sq>.<key>``,
the parameter's global shape, fp32); the ``common_state`` object (the optimizer's param groups with
their ``step``, the ``iteration``); and one ``_extra_state`` object per layer of each parallel linear
layer (``None``: what Megatron's non-Transformer-Engine layers save).

A torch_dist checkpoint holds global tensors in Megatron's tp=1 layout (QKV interleaved per query
group, fc1 ``[gate; up]``); each rank of a Megatron job reads its own slice of them. So the target
topology decides what is refused (checked before any byte is written: tp must divide the attention
heads, the query groups, the FFN width and the vocabulary rows; pp the layers; ep needs experts),
not how the bytes are laid out. The source's parameters must carry Megatron's tp=1 names (a
Megatron checkpoint, or a universal checkpoint converted from one), or be a Hugging Face Llama
model, read through the ``megatron-llama`` map in reverse (q/k/v and gate/up fused; weights only).
Tensors are read from the source one layer at a time as torch's writer asks for them. Written by
process 0 (other processes of a torchrun job wait for it).

Vocabulary padding (``padded_vocab``, or ``vocab_divisible_by``: Megatron-LM's rule, the vocabulary
rounded up to a multiple of ``make_vocab_size_divisible_by x tp``): the embedding and output-layer
rows are padded as Megatron-LM's own checkpoint converters pad them (``tools/checkpoint``: the last
real row repeated); optimizer moments of the added rows are zero.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import time
from typing import Any, Callable, Mapping

import torch

from ucp.core._coord import get_coordinator
from ucp.core._errors import CheckpointExistsError, ConvertError, TopologyError
from ucp.core._topology import Topology
from ucp.grammar import Spec
from ucp.resharder import ArraySource, ReadStats, ReshardReport, check_recorded
from ucp.storage import Storage, read_counter

from ._hf import MegatronFromHf

__all__ = ["MegatronTarget", "ModelShape", "PaddedVocab", "megatron_names", "padded_vocab_size"]

LATEST = "latest_checkpointed_iteration.txt"
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
_TOP = ("embedding.", "decoder.", "output_layer.")
#: The optimizer's per-parameter states under their Megatron names (the fp32 master is ``param``).
_OPTIM = {"fp32": "param"}
#: The parallel linear layers of a transformer layer, each saving an ``_extra_state`` object.
_LINEAR = re.compile(r"((?:self_attention|mlp)\.linear_[a-z0-9_]+)\.weight")


def iteration_dir(step: int) -> str:
    """Megatron-LM's directory name for a step: ``iter_0000100``."""
    return f"iter_{step:07d}"


def megatron_names(source: ArraySource, hf_config: Mapping[str, Any] | None = None) -> Any:
    """``source`` when its parameters carry Megatron's tp=1 names, else a Hugging Face Llama model
    under them (:class:`~ucp.engines.megatron._hf.MegatronFromHf`), with ``hf_config`` (the model's
    ``config.json``) or the ``config.json`` beside the source's files: a Hugging Face folder, or a
    DCP / DeepSpeed save of a Hugging Face model given ``hf_config``.

    Raises:
        ConvertError: the names are neither (names the first parameter that does not fit).
    """
    names = source.names()
    odd = next((n for n in names if not n.startswith(_TOP)), None)
    if odd is None:
        return source
    inner = getattr(source, "source", None)
    storage = getattr(inner, "storage", None)
    if odd.startswith(("model.", "lm_head.")):
        if hf_config is not None:
            return MegatronFromHf(source, hf_config)
        if storage is not None and storage.exists("config.json"):
            return MegatronFromHf(source, json.loads(storage.read("config.json")))
        raise ConvertError(f"{source.url}: parameter {odd!r} is a Hugging Face name and no config.json is "
                           "beside the files; pass the model's config.json (--hf-config) for its head counts")
    raise ConvertError(f"{source.url}: parameter {odd!r} is not under Megatron's tp=1 names "
                       "(embedding.*, decoder.*, output_layer.*); --engine megatron writes a Megatron "
                       "checkpoint, a Megatron universal checkpoint or a Hugging Face Llama model "
                       "(a folder with its config.json, or any save of it with --hf-config)")


#: The tensors whose rows are the vocabulary.
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def padded_vocab_size(rows: int, tp: int, *, padded_vocab: int | None = None,
                      vocab_divisible_by: int | None = None) -> int:
    """The vocabulary size a Megatron job at ``tp`` builds its model with: ``padded_vocab`` as given,
    or ``rows`` rounded up to a multiple of ``vocab_divisible_by * tp`` (Megatron-LM's
    ``make_vocab_size_divisible_by`` rule), or ``rows`` (no padding).

    Raises:
        ConvertError: both options given, or a padded size smaller than the vocabulary (names both).
    """
    if padded_vocab is not None and vocab_divisible_by is not None:
        raise ConvertError(f"give the padded vocabulary size ({padded_vocab}) or its divisor "
                           f"({vocab_divisible_by}), not both")
    if vocab_divisible_by is not None:
        multiple = vocab_divisible_by * tp
        return -(-rows // multiple) * multiple
    if padded_vocab is None:
        return rows
    if padded_vocab < rows:
        raise ConvertError(f"padded vocabulary size {padded_vocab} is smaller than the vocabulary, {rows} rows "
                           "of embedding.word_embeddings.weight: padding only adds rows; pass a size of at "
                           f"least {rows}")
    return padded_vocab


class PaddedVocab:
    """``source`` with the vocabulary rows (:data:`_VOCAB_ROWS`) padded to ``size``: the weights and
    fp32 masters by repeating the last real row (what Megatron-LM's checkpoint converters do),
    other optimizer states with zeros."""

    def __init__(self, source: Any, size: int) -> None:
        self.source, self.size = source, size
        self.rows = source.info(_VOCAB_ROWS[0]).shape[0]
        for attr in ("url", "step", "topology", "config", "groups"):
            if hasattr(source, attr):
                setattr(self, attr, getattr(source, attr))

    def __getattr__(self, name: str) -> Any:  # param_groups, buffer_names, ...: the source's
        return getattr(self.source, name)

    def names(self) -> list[str]:
        return self.source.names()

    def info(self, name: str) -> Any:
        info = self.source.info(name)
        if name not in _VOCAB_ROWS:
            return info
        return dataclasses.replace(info, shape=(self.size, *info.shape[1:]))

    def read(self, name: str, state: str | None = "param", region: Any = None) -> torch.Tensor:
        if name not in _VOCAB_ROWS:
            return self.source.read(name, state, region)
        if region is not None:
            raise ConvertError(f"{name}: a padded vocabulary is read whole")
        t = self.source.read(name, state, None)
        extra = self.size - t.shape[0]
        if extra == 0:
            return t
        fill = t[-1:].expand(extra, *t.shape[1:]) if state in ("param", "fp32", None) else \
            torch.zeros(extra, *t.shape[1:], dtype=t.dtype)
        return torch.cat([t, fill])


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the target topology is checked against: sizes read from the tensors' shapes, and the
    head counts where the source records them (a Hugging Face ``config.json``; Megatron-LM's
    ``args``)."""

    layers: int
    vocab: int | None
    ffn: int | None
    qkv_rows: int | None
    heads: int | None
    groups: int | None
    experts: bool

    @classmethod
    def of(cls, source: Any) -> "ModelShape":
        layers, vocab, ffn, qkv = set(), None, None, None
        experts = False
        for name in source.names():
            m = _LAYER.fullmatch(name)
            if m:
                layers.add(int(m.group(1)))
                experts = experts or ".experts." in m.group(2)
                if m.group(2) == "mlp.linear_fc2.weight":
                    ffn = source.info(name).shape[-1]
                elif m.group(2) == "self_attention.linear_qkv.weight":
                    qkv = source.info(name).shape[0]
            elif name == "embedding.word_embeddings.weight":
                vocab = source.info(name).shape[0]
        heads, groups = _head_counts(source)
        return cls(len(layers), vocab, ffn, qkv, heads, groups, experts)

    def refuse(self, topology: Topology) -> None:
        """Raises TopologyError naming the parameter and the constraint a Megatron job at
        ``topology`` would break."""
        tp, pp = topology.tp, topology.pp
        checks = [("tp", tp, self.heads, "num_attention_heads (attention heads)"),
                  ("tp", tp, self.groups, "num_query_groups (key/value heads)"),
                  ("tp", tp, self.ffn, "ffn_hidden_size (columns of decoder.layers.*.mlp.linear_fc2.weight)"),
                  ("tp", tp, self.vocab, "the vocabulary (rows of embedding.word_embeddings.weight; "
                   "pad it with --padded-vocab or --make-vocab-size-divisible-by)"),
                  ("tp", tp, self.qkv_rows, "the rows of decoder.layers.*.self_attention.linear_qkv.weight"),
                  ("pp", pp, self.layers, "num_layers (decoder.layers.*)")]
        share = {"tp": "tensor-parallel rank an equal share", "pp": "pipeline stage an equal number of layers"}
        for axis, size, value, what in checks:
            if value is not None and value % size:
                raise TopologyError(f"{axis}={size} does not divide {what} = {value}: Megatron gives every "
                                    f"{share[axis]}; pick a {axis} that divides {value}")
        if self.experts:
            raise ConvertError("the model has mixture-of-experts layers (decoder.layers.*.mlp.experts.*); "
                               "the megatron target writes dense models only")
        if topology.ep > 1:
            raise TopologyError(f"ep={topology.ep}: the model has no experts (no decoder.layers.*.mlp.experts.*) "
                                "to share out; use ep=1")


def _head_counts(source: Any) -> tuple[int | None, int | None]:
    """(attention heads, query groups) from a Hugging Face config or Megatron-LM's args; None
    where the source does not record them."""
    if isinstance(source, PaddedVocab):
        source = source.source
    config = getattr(source, "config", None)
    if isinstance(config, Mapping):  # a Hugging Face model read through the map
        return config.get("num_attention_heads"), getattr(source, "groups", None)
    args = _megatron_args(source)
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None) if getattr(args, "group_query_attention", False) else heads
    return (heads if isinstance(heads, int) else None), (groups if isinstance(groups, int) else None)


def _megatron_args(source: Any) -> Any:
    """Megatron-LM's ``args`` from a Megatron source's common state, or None."""
    inner = getattr(source, "source", None)
    common = getattr(inner, "_common", None)
    if not callable(common):
        return None
    values = list(common())
    while values:
        value = values.pop(0)
        if isinstance(value, list):  # Megatron stores its common state as [value]
            values[:0] = value
        elif isinstance(value, dict) and value.get("args") is not None:
            return value["args"]
    return None


def _common_state(source: Any, step: int, optimizer: bool) -> dict[str, Any]:
    """What Megatron's ``common_state`` holds: the iteration, and the optimizer's param groups
    (hyper-parameters and ``step``, without members) with the format of its states."""
    common: dict[str, Any] = {"iteration": step, "checkpoint_version": 3.0}
    if optimizer:
        groups = [dict(g) for g in source.param_groups]
        for g in groups:
            g.pop("params", None)
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
        common["optimizer"] = {"optimizer": {"param_groups": groups},
                               "param_state_sharding_type": "fully_reshardable"}
    return common


def _blob(value: Any) -> io.BytesIO:
    """A ``ShardedObject``'s bytes as Megatron stores them: ``torch.save([value])``."""
    out = io.BytesIO()
    torch.save([value], out)
    out.seek(0)
    return out


def plan_items(source: Any, step: int, *, verify: bool = False,
               where: str = "") -> tuple[list[Any], dict[str, Callable[[], Any]]]:
    """DCP write items (one per layer of a stacked key) and, by item, how its data is read
    (``verify``: each state read is checked against the fingerprint a universal source records)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    names = source.names()
    layers = 1 + max((int(m.group(1)) for n in names if (m := _LAYER.fullmatch(n))), default=-1)
    optimizer = any(set(source.info(n).states) - {"param", "fp32", "step"} for n in names)
    items: list[Any] = []
    data: dict[str, Callable[[], Any]] = {}

    def read(name: str, state: str) -> torch.Tensor:
        t = source.read(name, state, None)
        if verify:  # the source's own rows (padding is not in it)
            rows = source.rows if isinstance(source, PaddedVocab) and name in _VOCAB_ROWS else None
            check_recorded(source, name, state, t[:rows], f"{where} {name}")
        return t.to(torch.float32) if state != "param" else t

    def tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, layer: int | None,
               read: Callable[[], torch.Tensor]) -> None:
        size = torch.Size(shape if layer is None else (layers, *shape))
        offsets = torch.Size((0,) * len(shape) if layer is None else (layer, *(0,) * len(shape)))
        sizes = torch.Size(shape if layer is None else (1, *shape))
        index = MetadataIndex(key, offsets)
        items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            ChunkStorageMetadata(offsets, sizes), TensorProperties(dtype=dtype), size)))
        data[f"{key}@{tuple(offsets)}"] = read if layer is None else (lambda: read().unsqueeze(0))

    def blob(key: str, value: Any) -> None:
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        data[f"{key}@None"] = lambda: _blob(value)

    for name in names:
        info = source.info(name)
        m = _LAYER.fullmatch(name)
        key, layer = (f"decoder.layers.{m.group(2)}", int(m.group(1))) if m else (name, None)
        tensor(key, tuple(info.shape), info.dtype, layer,
               lambda n=name: read(n, "param"))
        if m and _LINEAR.fullmatch(m.group(2)):
            module = _LINEAR.fullmatch(m.group(2)).group(1)
            blob(f"decoder.layers.{module}._extra_state/shard_{layer}_{layers}", None)
        if not optimizer or info.frozen:
            continue
        for state in info.states:
            if state in ("param", "step"):
                continue
            tensor(f"optimizer.state.{_OPTIM.get(state, state)}.{key}", tuple(info.shape), torch.float32,
                   layer, lambda n=name, s=state: read(n, s))
    blob("common_state/shard_0_1", _common_state(source, step, optimizer))
    return items, data


def _planner(items: list[Any], data: Mapping[str, Callable[[], Any]], on_tensor: Callable[[Any, str], None]) -> Any:
    """A DCP save planner whose plan is ``items`` and whose data is read when the writer asks."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan

    class _Items(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items=list(items))
            return self.plan

        def resolve_data(self, write_item: Any) -> Any:
            offsets = write_item.index.offset
            key = f"{write_item.index.fqn}@{None if offsets is None else tuple(offsets)}"
            value = data[key]()
            if isinstance(value, torch.Tensor):
                on_tensor(value, write_item.index.fqn)
                return value.contiguous()
            return value

    return _Items(flatten_state_dict=False, flatten_sharded_tensors=False)


class MegatronTarget:
    """Writes a Megatron-core torch_dist checkpoint (see the module docstring)."""

    name = "megatron"
    default_alignment = 1

    def write(self, source: ArraySource, dst: str, *, topology: Topology, spec: Spec | None,
              alignment: int, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, workers: int,
              progress: bool, verify: bool = False, padded_vocab: int | None = None,
              vocab_divisible_by: int | None = None,
              hf_config: Mapping[str, Any] | None = None) -> ReshardReport:
        """``verify``: each model tensor read must have the fingerprint a universal ``source``
        records for it. ``padded_vocab`` / ``vocab_divisible_by``: pad the vocabulary (see
        :func:`padded_vocab_size`). ``hf_config``: a Hugging Face model's ``config.json``, for a
        source under Hugging Face names without one beside its files."""
        start = time.perf_counter()
        view = megatron_names(source, hf_config)
        if padded_vocab is not None or vocab_divisible_by is not None:
            if "embedding.word_embeddings.weight" not in view.names():
                raise ConvertError(f"{source.url}: no embedding.word_embeddings.weight to pad the vocabulary of")
            rows = view.info("embedding.word_embeddings.weight").shape[0]
            size = padded_vocab_size(rows, topology.tp, padded_vocab=padded_vocab,
                                     vocab_divisible_by=vocab_divisible_by)
            if size != rows:
                view = PaddedVocab(view, size)
        ModelShape.of(view).refuse(topology)  # before any byte is written
        storage = Storage(dst, storage_options=storage_options)
        which = iteration_dir(step)
        coord = get_coordinator(600.0)
        if storage.exists(f"{which}/metadata.json") and not overwrite:
            raise CheckpointExistsError(f"{dst} already holds Megatron save {which}; pass overwrite=True "
                                        "(--overwrite) to replace it")
        coord.all_gather_json(None, what="starting to write the Megatron checkpoint")
        written, before = [0], read_counter()
        if coord.rank == 0:
            _save(view, storage, which, step, verify=verify, written=written)
        coord.all_gather_json(None, what="writing the Megatron checkpoint")
        read = (read_counter() - before).bytes
        stats = ReadStats(bytes_read=read, bytes_needed=written[0]) if coord.rank == 0 else ReadStats()
        return ReshardReport(dst, self.name, topology, step, (0,) if coord.rank == 0 else (), stats,
                             time.perf_counter() - start)


def _save(source: Any, storage: Storage, which: str, step: int, *, verify: bool, written: list[int]) -> None:
    import torch.distributed.checkpoint as dcp

    sub = storage.child(which)
    items, data = plan_items(source, step, verify=verify, where=sub.url)
    for stale in ("metadata.json", ".metadata"):  # uncommitted while its files are replaced
        if sub.exists(stale):
            sub.delete(stale)

    def counted(t: torch.Tensor, key: str) -> None:
        written[0] += t.numel() * t.element_size()

    if storage.is_local:
        writer = dcp.FileSystemWriter(sub.path(""), single_file_per_rank=True, thread_count=1)
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(sub.url, single_file_per_rank=True, thread_count=1)
    dcp.save({}, storage_writer=writer, planner=_planner(items, data, counted), no_dist=True)
    sub.write("metadata.json", json.dumps({"sharded_backend": "torch_dist",
                                           "sharded_backend_version": 1}).encode())
    storage.write(LATEST, str(step).encode())

