"""``ucp reshard``: a checkpoint laid out for another topology."""

from __future__ import annotations

import json
from typing import Any

import click

from ucp.cli._base import TopologyType, storage_option, storage_options, ucp_command
from ucp.core._topology import Topology

__all__ = ["reshard"]


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--to", "topology", required=True, type=TopologyType(),
              help="Target topology, e.g. dp=2,tp=2,pp=1,zero=1 (omitted axes are 1, zero 0).")
@click.option("--engine", default="ucp", show_default=True,
              help="Target layout: ucp (native per-rank files), dcp, torchtitan (DST/step-N for its "
                   "checkpoint.folder), accelerate (a load_state folder), deepspeed (DeepSpeed's native "
                   "ZeRO files), deepspeed-universal, megatron, or an engine with a reshard target.")
@click.option("--spec", default=None,
              help="UCL spec for tp/pp cuts (a bundled name, a file, or UCL text); default: the "
                   "one SRC stores.")
@click.option("--config", "--hf-config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The model's Hugging Face config.json: --engine deepspeed at tp > 1 takes its head counts "
                   "(how AutoTP cuts attention, instead of a spec's heads/kv_heads); --engine megatron "
                   "reads a source under Hugging Face names with it (--hf-config is the same option).")
@click.option("--src-engine", default="auto", show_default=True,
              help="Engine of SRC when it is not a universal checkpoint (converted on the fly).")
@click.option("--alignment", default=None, type=click.IntRange(1),
              help="ZeRO partitions hold a multiple of this many elements (default: the engine's).")
@click.option("--step", "tag", default=None, help="Step/tag of SRC (default: newest).")
@click.option("--overwrite", is_flag=True, help="Replace the step if DST already has it.")
@click.option("--io-threads", "workers", default=8, show_default=True,
              type=click.IntRange(1, 256), help="Reads in flight.")
@click.option("--no-verify", is_flag=True,
              help="Skip the check of every resharded state against SRC by fingerprint.")
@click.option("--partition", default=None,
              help="--engine deepspeed, PipelineModule source: the loading job's partition_method "
                   "(parameters, DeepSpeed's default; uniform) or its stage boundaries, e.g. 0,3,6.")
@click.option("--extra-layer", "extra_layers", multiple=True, metavar="INDEX[=TIED_KEY]",
              help="With --partition's targets: a layer that saves no file, which the checkpoint cannot "
                   "show (a function; INDEX=KEY: a TiedLayerSpec with forward_fn). Repeatable.")
@click.option("--padded-vocab", default=None, type=click.IntRange(1),
              help="--engine megatron: pad the vocabulary rows (embedding, output layer) to this size, "
                   "the vocabulary size the Megatron job builds its model with.")
@click.option("--make-vocab-size-divisible-by", "vocab_divisible_by", default=None, type=click.IntRange(1),
              help="--engine megatron: pad the vocabulary to a multiple of this times tp (Megatron-LM's "
                   "rule and option name; Megatron-LM's default is 128).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@storage_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@ucp_command
def reshard(src: str, dst: str, topology: Topology, engine: str, spec: str | None, config: str | None,
            src_engine: str, alignment: int | None, tag: str | None, overwrite: bool,
            workers: int, no_verify: bool, partition: str | None, extra_layers: tuple[str, ...],
            padded_vocab: int | None, vocab_divisible_by: int | None, as_json: bool,
            options: tuple[tuple[str, Any], ...], quiet: bool) -> None:
    """Write checkpoint SRC for another parallel topology at DST.

    SRC is a universal checkpoint, or any checkpoint `ucp convert` reads (converted on the fly,
    nothing else written). Each target rank's files hold its TP/PP cut and its ZeRO partitions
    (docs/resharding.md); `ucp.load(DST, rank=r)` returns rank r's state.

    \b
    Example:
      ucp reshard ./universal ./ckpt_dp4 --to dp=4,tp=1,pp=1,zero=1
      ucp reshard ./megatron_tp2pp2 ./ckpt_tp4 --to tp=4,zero=0 --spec llama_megatron
      ucp reshard ./hf_llama ./megatron_run --to tp=2,pp=2,dp=2 --engine megatron \
          --make-vocab-size-divisible-by 128
      ucp reshard ./ds_tp1 ./ds_tp2 --to tp=2,dp=2,zero=1 --engine deepspeed --config config.json
    """
    from ucp.ops._reshard import _read_config
    from ucp.ops._reshard import reshard as _reshard

    so = storage_options(options)
    hf_config = None
    if config is not None:
        if engine == "megatron":  # the names and head layout of a source under Hugging Face names
            hf_config = config
        elif engine != "deepspeed" or spec is not None:
            raise click.UsageError("--config gives the model's Hugging Face config.json to --engine deepspeed "
                                   "(AutoTP's head counts; without --spec: put heads = N and kv_heads = M in "
                                   "the spec instead) or --engine megatron (a source under Hugging Face names)")
        else:
            from ucp.engines.deepspeed._native_tp import head_spec

            spec = head_spec(_read_config(config), config)
    report = _reshard(src, dst, topology=topology, engine=engine, spec=spec, alignment=alignment,
                      src_engine=src_engine, tag=tag, overwrite=overwrite, workers=workers,
                      storage_options=so, dst_storage_options=so,
                      progress=None if not quiet else False, verify=not no_verify, partition=partition,
                      extra_layers=extra_layers, padded_vocab=padded_vocab, vocab_divisible_by=vocab_divisible_by,
                      hf_config=hf_config)
    stats = report.stats
    if as_json:
        click.echo(json.dumps({"url": dst, "engine": report.engine, "step": report.step,
                               "topology": str(report.topology), "ranks": len(report.ranks),
                               "seconds": report.seconds, "reads": stats.to_dict()}))
        return
    click.echo(f"wrote {dst}: step {report.step}, {report.job_ranks} ranks "
               f"({report.topology}), engine {report.engine}; read {stats.bytes_read / 2**20:.1f} MiB "
               f"for {stats.bytes_needed / 2**20:.1f} MiB needed (amplification "
               f"{stats.amplification:.3f}) in {report.seconds:.1f}s")

