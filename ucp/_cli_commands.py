"""The conversion and resharding commands of the ``ucp`` group."""

from __future__ import annotations

import click

from .cli import main, progress_enabled, ucp_command


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--engine", default="auto", show_default=True,
              help="Engine plugin of SRC (ucp, deepspeed, dcp, ...), or auto to detect it.")
@click.option("--spec", default=None, help="UCL spec (file or bundled name) for TP/PP layouts.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes converting in parallel.")
@click.option("--step", "tag", default=None, help="Step/tag of SRC to convert (default: newest).")
@click.option("--overwrite", is_flag=True, help="Replace a complete universal checkpoint at DST.")
@click.option("--no-verify", is_flag=True,
              help="Skip fingerprinting: no check that DST holds what SRC holds, none recorded.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@ucp_command
def convert(src: str, dst: str, engine: str, spec: str | None, workers: int, tag: str | None,
            overwrite: bool, no_verify: bool, quiet: bool) -> None:
    """Consolidate a distributed checkpoint SRC into a universal checkpoint DST.

    \b
    Example:
      ucp convert ./ds_ckpt ./universal --engine deepspeed --workers 2
    """
    from ._convert import convert as _convert

    ckpt = _convert(src, dst, engine=engine, spec=spec, workers=workers, tag=tag,
                    overwrite=overwrite, verify=not no_verify, progress=progress_enabled(quiet))
    names = ckpt.names()
    click.echo(f"wrote {dst}: {len(names)} parameters, {len(ckpt.buffer_names())} buffers, "
               f"step {ckpt.step}")
