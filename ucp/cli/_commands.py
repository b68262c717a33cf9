"""The conversion and resharding commands of the ``ucp`` group."""

from __future__ import annotations

from typing import Any

import click

from ucp.cli._base import progress_enabled, storage_option, storage_options, ucp_command

__all__ = ["convert"]


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--engine", default="auto", show_default=True,
              help="Engine plugin of SRC (ucp, deepspeed, dcp, ...), or auto to detect it.")
@click.option("--spec", default=None,
              help="UCL spec for TP/PP layouts: a bundled name, a file, or UCL text.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="Worker processes converting in parallel.")
@click.option("--step", "tag", default=None, help="Step/tag of SRC to convert (default: newest).")
@click.option("--overwrite", is_flag=True, help="Replace a complete universal checkpoint at DST.")
@click.option("--no-verify", is_flag=True,
              help="Skip fingerprinting: no check that DST holds what SRC holds, none recorded.")
@storage_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@ucp_command
def convert(src: str, dst: str, engine: str, spec: str | None, workers: int, tag: str | None,
            overwrite: bool, no_verify: bool, options: tuple[tuple[str, Any], ...], quiet: bool) -> None:
    """Consolidate a distributed checkpoint SRC into a universal checkpoint DST.

    \b
    Example:
      ucp convert ./ds_ckpt ./universal --engine deepspeed --workers 2
    """
    from ucp.ops._convert import convert as _convert

    so = storage_options(options)
    ckpt = _convert(src, dst, engine=engine, spec=spec, workers=workers, tag=tag,
                    overwrite=overwrite, verify=not no_verify, storage_options=so, dst_storage_options=so,
                    progress=progress_enabled(quiet))
    names = ckpt.names()
    click.echo(f"wrote {dst}: {len(names)} parameters, {len(ckpt.buffer_names())} buffers, "
               f"step {ckpt.step}")
