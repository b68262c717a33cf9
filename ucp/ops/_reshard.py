"""``ucp.reshard``: a checkpoint laid out for another topology (and engine), written to disk."""

from __future__ import annotations

import re
import sys
from typing import Any, Mapping, Sequence

from ucp.ops._dest import check_destination, refuse_foreign
from ucp.native._layout import LATEST
from ucp.native._meta import parse_step_dir
from ucp.core._errors import ConvertError, TopologyError
from ucp.core._topology import Topology

__all__ = ["reshard"]


def reshard(src: str, dst: str, *, topology: Topology | str, engine: str = "ucp", spec: Any = None,
            alignment: int | None = None, src_engine: str = "auto", tag: str | None = None,
            step: int | None = None, overwrite: bool = False, workers: int = 8, verify: bool = True,
            storage_options: Mapping[str, Any] | None = None,
            dst_storage_options: Mapping[str, Any] | None = None,
            progress: bool | None = None, partition: str | None = None,
            extra_layers: Sequence[str] = (), padded_vocab: int | None = None,
            vocab_divisible_by: int | None = None, hf_config: str | Mapping[str, Any] | None = None) -> Any:
    """Writes the checkpoint at ``src`` for ``topology`` at ``dst``, in ``engine``'s layout.

    Called by one process, or by every process of a torchrun job (target ranks are shared out;
    process 0 commits). Each target rank's state is planned first (a topology the model cannot
    take fails before any tensor is read), then read chunk by chunk and written; memory holds one
    target rank's state at a time.

    Args:
        src: a universal checkpoint, or any checkpoint ``ucp convert`` reads (converted on the
            fly, parameter by parameter; no universal copy is written).
        dst: where the resharded checkpoint goes (local path or fsspec URL).
        topology: target topology, e.g. ``"dp=2,tp=2,pp=1,zero=1"``.
        engine: target layout: ``"ucp"`` (ucp's native per-rank format, read back with
            ``ucp.load(dst, rank=r)``), ``"dcp"`` (a torch DCP checkpoint that ``dcp.load``
            reads onto any sharding), ``"torchtitan"`` (``dst/step-<N>/`` for torchtitan's
            ``CheckpointManager``, ``checkpoint.folder``), ``"accelerate"`` (a folder
            ``Accelerator.load_state`` reads under FSDP), ``"deepspeed"`` (DeepSpeed's native ZeRO-1/2/3 files,
            loaded by ``engine.load_checkpoint``), ``"deepspeed-universal"`` (DeepSpeed's
            universal layout), ``"megatron"`` (a torch_dist save root that Megatron-core's
            ``dist_checkpointing.load`` reads at ``topology``'s tp/pp), or an engine plugin that
            provides a reshard target.
        spec: UCL spec (Spec, bundled name, path or text) for tp/pp/ep cuts; default: the one
            stored in the universal checkpoint. ``engine="deepspeed"`` at tp > 1 reads its
            ``heads`` / ``kv_heads`` constants (``"heads = 32\nkv_heads = 8"``): how AutoTP cuts
            attention.
        alignment: ZeRO partitions hold a multiple of this many elements (default: the target
            engine's; 1 for ``ucp``).
        src_engine / tag / storage_options: how to open ``src`` (as ``ucp.convert`` does).
        step: the step to write (default: the source's, else 0).
        overwrite: replace that step if ``dst`` already has it.
        workers: reads in flight.
        verify: before committing, check every state the target ranks hold against the source
            by fingerprint (see :mod:`ucp.core._fingerprint`; engine ``ucp``).
        dst_storage_options: fsspec options for ``dst``.
        progress: progress bar on stderr (default: when stderr is a terminal).
        partition: ``engine="deepspeed"`` with a PipelineModule source: the loading job's
            ``partition_method`` (``"parameters"``, DeepSpeed's default, or ``"uniform"``) or its
            stage boundaries (``"0,3,6"``), which decide the layers of each stage.
        extra_layers: with ``partition``'s targets, layers that save no file and that the
            checkpoint cannot show: ``"INDEX"`` (a function) or ``"INDEX=TIED_KEY"`` (a
            ``TiedLayerSpec`` with ``forward_fn``).
        padded_vocab / vocab_divisible_by (engine ``megatron`` only): write the vocabulary rows
            (embedding and output layer) padded to this size, or to a multiple of
            ``vocab_divisible_by * tp`` (Megatron-LM's ``--make-vocab-size-divisible-by`` rule), as
            the Megatron job's model is built; default: the source's size.
        hf_config (engine ``megatron`` only): a Hugging Face ``config.json`` (path or dict) for a
            source under Hugging Face Llama names that has none beside its files (a DCP,
            accelerate or DeepSpeed save of a transformers model).

    Returns:
        A :class:`ucp.resharder.ReshardReport` (``.stats.amplification``: bytes read / needed).

    Raises:
        TopologyError: the model cannot take ``topology`` (names the parameter and constraint).
        CheckpointExistsError: ``dst`` has the step and ``overwrite`` is False.
        VerificationError: a state as resharded differs from the source's (names it).

    Example:
        >>> ucp.reshard("universal/", "ckpt_tp1/", topology="dp=4,zero=1")
        >>> ucp.load("ckpt_tp1/", rank=3)["optim"]["flat"][0]["exp_avg"]
    """
    from ucp.engines.dcp import _target as _dcp_target  # noqa: F401 - registers engine="dcp"
    from ucp.engines.deepspeed import _native  # noqa: F401 - registers engine="deepspeed" (native files)
    from ucp.engines.deepspeed import _target  # noqa: F401 - registers engine="deepspeed-universal"
    from ucp.resharder import get_target
    from ucp.resharder._api import resolve

    pipe = {} if partition is None and not extra_layers else {"partition": partition,
                                                              "extra_layers": tuple(extra_layers)}
    if pipe and engine != "deepspeed":
        raise TopologyError(f"partition / extra_layers place a DeepSpeed PipelineModule's layers on stages; "
                            f"engine={engine!r} takes neither: leave them unset")
    check_destination(src, dst)
    vocab = {k: v for k, v in (("padded_vocab", padded_vocab), ("vocab_divisible_by", vocab_divisible_by))
             if v is not None}
    if hf_config is not None and engine != "megatron":
        raise ConvertError(f"hf_config names a Hugging Face model for --engine megatron only, not {engine!r}")
    if vocab and engine != "megatron":
        raise ConvertError(f"{' and '.join(vocab)} pad a Megatron vocabulary: they apply to --engine megatron "
                           f"only, not {engine!r}")
    for key, value in vocab.items():
        if value < 1:
            raise ConvertError(f"{key}={value}: must be a positive number of rows")
    if engine == "ucp":  # its files: step directories and `latest`
        refuse_foreign(dst, ours=lambda n: n == LATEST or parse_step_dir(n) is not None,
                       what="a ucp checkpoint", storage_options=dst_storage_options)
    elif engine == "dcp":  # its files: .metadata and the .distcp data files
        refuse_foreign(dst, ours=lambda n: n == ".metadata" or n.endswith(".distcp"),
                       what="a DCP checkpoint", storage_options=dst_storage_options)
    elif engine == "torchtitan":  # its checkpoint.folder: step-N/ DCP directories
        refuse_foreign(dst, ours=lambda n: re.fullmatch(r"step-\d+", n) is not None,
                       what="a torchtitan checkpoint folder", storage_options=dst_storage_options)
    elif engine == "accelerate":  # what Accelerator.save_state writes
        refuse_foreign(dst, ours=lambda n: _dcp_target.ACCEL_NAMES.match(n) is not None,
                       what="an accelerate save_state folder", storage_options=dst_storage_options)
    elif engine == "megatron":  # a Megatron-LM save root: iter_NNNNNNN/ and the latest marker
        refuse_foreign(dst, ours=lambda n: n == "latest_checkpointed_iteration.txt" or n.startswith("iter_"),
                       what="a Megatron-LM save root", storage_options=dst_storage_options)
    options: dict[str, Any] = dict(vocab)
    if hf_config is not None:
        options["hf_config"] = _read_config(hf_config)
    target = get_target(engine)
    source, topo, spec_ = resolve(src, topology, spec=spec, engine=src_engine, tag=tag,
                                  storage_options=storage_options)
    step = step if step is not None else source.step if source.step is not None else 0
    return target.write(source, dst, topology=topo, spec=spec_,
                        alignment=target.default_alignment if alignment is None else alignment,
                        step=step, overwrite=overwrite, storage_options=dst_storage_options,
                        workers=workers, progress=sys.stderr.isatty() if progress is None else progress,
                        verify=verify, **pipe, **options)


def _read_config(config: str | Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face ``config.json`` given as a path or a mapping."""
    import json

    if isinstance(config, Mapping):
        return dict(config)
    try:
        with open(config, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{config}: cannot read the Hugging Face config ({e}); pass the model's config.json") from e
    if not isinstance(value, dict):
        raise ConvertError(f"{config}: a Hugging Face config.json is a JSON object")
    return value
