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
              help="Target layout: ucp (native per-rank files), dcp, deepspeed (DeepSpeed's native ZeRO "
                   "files), deepspeed-universal, or an engine with a reshard target.")
@click.option("--spec", default=None,
              help="UCL spec for tp/pp cuts (a bundled name, a file, or UCL text); default: the "
                   "one SRC stores.")
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
@click.option("--padded-vocab", default=None, type=click.IntRange(1),
              help="--engine megatron: pad the vocabulary rows (embedding, output layer) to this size, "
                   "the vocabulary size the Megatron job builds its model with.")
@click.option("--make-vocab-size-divisible-by", "vocab_divisible_by", default=None, type=click.IntRange(1),
              help="--engine megatron: pad the vocabulary to a multiple of this times tp (Megatron-LM's "
                   "rule and option name; Megatron-LM's default is 128).")
@click.option("--hf-config", default=None, type=click.Path(exists=True, dir_okay=False),
              help="--engine megatron: the config.json of a Hugging Face Llama whose save (DCP, "
                   "accelerate, DeepSpeed) has none beside its files.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@storage_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@ucp_command
def reshard(src: str, dst: str, topology: Topology, engine: str, spec: str | None,
            src_engine: str, alignment: int | None, tag: str | None, overwrite: bool,
            workers: int, no_verify: bool, padded_vocab: int | None, vocab_divisible_by: int | None,
            hf_config: str | None, as_json: bool, options: tuple[tuple[str, Any], ...],
            quiet: bool) -> None:
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
    """
    from ucp.ops._reshard import reshard as _reshard

    so = storage_options(options)
    report = _reshard(src, dst, topology=topology, engine=engine, spec=spec, alignment=alignment,
                      src_engine=src_engine, tag=tag, overwrite=overwrite, workers=workers,
                      storage_options=so, dst_storage_options=so,
                      progress=None if not quiet else False, verify=not no_verify,
                      padded_vocab=padded_vocab, vocab_divisible_by=vocab_divisible_by, hf_config=hf_config)
    stats = report.stats
    if as_json:
        click.echo(json.dumps({"url": dst, "engine": report.engine, "step": report.step,
                               "topology": str(report.topology), "ranks": len(report.ranks),
                               "seconds": report.seconds, "reads": stats.to_dict()}))
        return
    click.echo(f"wrote {dst}: step {report.step}, {report.topology.world_size} ranks "
               f"({report.topology}), engine {report.engine}; read {stats.bytes_read / 2**20:.1f} MiB "
               f"for {stats.bytes_needed / 2**20:.1f} MiB needed (amplification "
               f"{stats.amplification:.3f}) in {report.seconds:.1f}s")
