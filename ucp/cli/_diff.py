"""``ucp diff``: the command and its text output (the comparison is :mod:`ucp.ops._diff`)."""

from __future__ import annotations

import json
from typing import Any

import click

from ucp.cli._base import progress_enabled, storage_option, storage_options, ucp_command
from ucp.core._text import display_url

__all__ = ["diff"]


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--states", default=None,
              help="Comma-separated states to compare (param, fp32, exp_avg, ..., buffer); default all.")
@click.option("--atol", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Absolute tolerance: close when |a - b| <= atol + rtol * |b|.")
@click.option("--rtol", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Relative tolerance (see --atol).")
@click.option("--engine-a", default="auto", show_default=True, help="Format of A (as for convert).")
@click.option("--engine-b", default="auto", show_default=True, help="Format of B (as for convert).")
@click.option("--step-a", "tag_a", default=None, help="Step/tag of A (default: newest).")
@click.option("--step-b", "tag_b", default=None, help="Step/tag of B (default: newest).")
@click.option("--spec", default=None, help="UCL spec for sources whose TP/PP layout needs one.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema ucp.diff, version 1).")
@click.option("--all", "show_all", is_flag=True, help="Also list the states that are equal.")
@storage_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@ucp_command
def diff(a: str, b: str, states: str | None, atol: float, rtol: float, engine_a: str,
         engine_b: str, tag_a: str | None, tag_b: str | None, spec: str | None, as_json: bool,
         show_all: bool,
         options: tuple[tuple[str, Any], ...], quiet: bool) -> None:
    """Compare checkpoints A and B parameter by parameter and state by state.

    Either may be a universal checkpoint or anything `ucp convert` reads, in any layout. Exit 0
    when every state is equal (or close, within --atol/--rtol) and no name is on one side only;
    1 otherwise.

    \b
    Example:
      ucp diff ./ds_ckpt ./universal
      ucp diff ./universal ./resharded --states exp_avg,exp_avg_sq --rtol 1e-6 --json
    """
    from ucp.ops._diff import diff_checkpoints

    wanted = None if states is None else [s.strip() for s in states.split(",") if s.strip()]
    report = diff_checkpoints(a, b, states=wanted, atol=atol, rtol=rtol, engine_a=engine_a,
                              engine_b=engine_b, tag_a=tag_a, tag_b=tag_b, spec=spec,
                              storage_options=storage_options(options),
                              progress=progress_enabled(quiet))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for e in report.entries:
            if show_all or e.status not in ("equal", "close"):
                click.echo(str(e))
        counts = ", ".join(f"{n} {k}" for k, n in report.counts().items() if n)
        click.echo(f"{display_url(a)} vs {display_url(b)}: {counts or 'nothing to compare'}")
    if not report.equal:
        bad = sum(n for k, n in report.counts().items() if k not in ("equal", "close"))
        raise click.ClickException(f"{display_url(a)} and {display_url(b)} differ in {bad} "
                                   "parameter state(s) (listed above)")
