"""``ucp inspect``, ``ucp verify``, ``ucp export`` and ``ucp ls``: the commands, and their text
output. Each command calls the library (:mod:`ucp.ops._inspect`, :mod:`ucp.ops._verify`,
:mod:`ucp.ops._export`) and prints; ``--json`` prints the documented JSON instead (docs/cli.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import TYPE_CHECKING, Any, Iterable

import click

from ucp.cli._base import progress_enabled, spec_option, storage_option, storage_options, ucp_command
from ucp.native._steps import StepRow, display_url, human_bytes, parse_size

if TYPE_CHECKING:  # the readers (torch, zarr, engines) are imported by the commands themselves
    from ucp.ops._inspect import Report

__all__ = ["inspect", "verify", "export", "ls", "format_report", "format_steps"]


# -- parameter types ------------------------------------------------------------------------------

class _Size(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            size = parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if size <= 0:
            self.fail(f"{value!r} must be larger than 0", param, ctx)
        return size


_engine_option = click.option(
    "--engine", default="auto", show_default=True,
    help="Format of the checkpoint: auto, universal, safetensors, or an engine (ucp, dcp, "
         "deepspeed, ...).")
_step_option = click.option("--step", "tag", default=None,
                            help="Step (native root) or tag (engine) to read; default: the newest.")


# -- commands -------------------------------------------------------------------------------------

@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema ucp.inspect, version 1).")
@_engine_option
@_step_option
@spec_option
@storage_option
@ucp_command
def inspect(path: str, as_json: bool, engine: str, tag: str | None, spec: str | None,
            options: tuple[tuple[str, Any], ...]) -> None:
    """Show what the checkpoint at PATH holds: format, step, topology, commit status, and every
    parameter's shape, dtype, states and size. Reads metadata, not parameter data.

    \b
    Example:
      ucp inspect ./ckpt
      ucp inspect ./universal --json | jq '.totals'
    """
    from ucp.ops._inspect import inspect_checkpoint

    report = inspect_checkpoint(path, engine=engine, spec=spec, tag=tag,
                                storage_options=storage_options(options))
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else format_report(report))


@click.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema ucp.verify, version 1).")
@_engine_option
@_step_option
@spec_option
@storage_option
@click.option("--deep", is_flag=True, help="Also recompute every array's (native: fragment's) "
              "fingerprint from its data and compare it with the one recorded at conversion (save).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@ucp_command
def verify(path: str, as_json: bool, engine: str, tag: str | None, spec: str | None,
           options: tuple[tuple[str, Any], ...], deep: bool, quiet: bool) -> None:
    """Check the checkpoint at PATH: every checksum, every parameter covered exactly once by its
    fragments, shapes that fit the spec. Exit 0 when all is well, 1 with the list of problems.

    \b
    Example:
      ucp verify ./ckpt --step 200
      ucp verify s3://bucket/universal --json
      ucp verify ./universal --deep
    """
    from ucp.ops._verify import verify_checkpoint

    report = verify_checkpoint(path, engine=engine, spec=spec, tag=tag,
                               storage_options=storage_options(options),
                               progress=progress_enabled(quiet), deep=deep)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=1))
    else:
        for p in report.problems:
            click.echo(str(p))
        for n in report.notes:
            click.echo(f"note: {n}")
        c = report.checked
        counts = [f"{c[k]} {k if c[k] != 1 else k[:-1]}"
                  for k in ("files", "chunks", "tensors", "params") if c[k]]
        step = "" if report.step is None else f" step {report.step}"
        click.echo(f"{display_url(path)}{step} ({report.format}): checked "
                   f"{', '.join(counts) or 'nothing'} ({human_bytes(c['bytes'])}): "
                   + ("ok" if report.ok else f"{len(report.problems)} problem(s)"))
    if not report.ok:
        raise click.ClickException(f"{display_url(path)}: {len(report.problems)} problem(s) found")


@click.command()
@click.argument("src")
@click.argument("dst")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="dtype of every floating-point tensor; default: the model's own.")
@click.option("--max-shard-size", type=_Size(), default="5GB", show_default=True,
              help="Largest shard file: 5GB (10**9 bytes), 500MB, 2GiB, or bytes.")
@spec_option
@_engine_option
@_step_option
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A config.json to copy into DST, for transformers' from_pretrained.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in DST.")
@click.option("--no-verify", is_flag=True, help="Skip the check of each tensor written against "
              "the fingerprint a universal SRC (or a native SRC's fragments) records.")
@click.option("--map", "hf_map", default=None, metavar="NAME",
              help="A bundled map to Hugging Face names and layouts (megatron-llama, torchtitan-llama); "
              "needs --config.")
@storage_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@ucp_command
def export(src: str, dst: str, dtype: str | None, max_shard_size: int, spec: str | None,
           engine: str, tag: str | None, config: str | None, overwrite: bool, no_verify: bool,
           hf_map: str | None, options: tuple[tuple[str, Any], ...], quiet: bool) -> None:
    """Write the model weights of SRC (a universal checkpoint, or anything `ucp convert` reads)
    as Hugging Face safetensors in DST: model.safetensors, or model-0000i-of-0000N.safetensors
    shards and model.safetensors.index.json. Names go through the spec's renames.

    \b
    Example:
      ucp export ./universal ./hf --dtype bf16 --max-shard-size 2GB --config config.json
    """
    from ucp.ops._export import export_hf

    so = storage_options(options)
    new_dir = None if "://" in dst or os.path.exists(dst) else dst
    try:
        result = export_hf(src, dst, dtype=dtype, max_shard_size=max_shard_size, spec=spec,
                           engine=engine, tag=tag, config=config, overwrite=overwrite,
                           verify=not no_verify, storage_options=so, dst_storage_options=so,
                           progress=progress_enabled(quiet), hf_map=hf_map)
    except BaseException:  # an error or Ctrl-C: leave no empty directory behind
        if new_dir is not None:
            with contextlib.suppress(OSError):  # not empty, or already gone
                os.rmdir(new_dir)
        raise
    shards = sum(f.endswith(".safetensors") for f in result.files)
    renamed = f", {result.renamed} renamed by the spec" if result.renamed else ""
    click.echo(f"wrote {display_url(dst)}: {result.tensors} tensors{renamed}, "
               f"{human_bytes(result.total_size)} in {shards} shard(s)")


@click.command()
@click.argument("url")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema ucp.ls, version 1).")
@storage_option
@ucp_command
def ls(url: str, as_json: bool, options: tuple[tuple[str, Any], ...]) -> None:
    """List the steps under the checkpoint root URL: commit status, size and age.

    \b
    Example:
      ucp ls ./ckpt
      ucp ls s3://bucket/run1 --json
    """
    from ucp.native._steps import SCHEMA_VERSION, list_steps

    so = storage_options(options)
    steps = list_steps(url, storage_options=so)
    if as_json:
        now = time.time()
        click.echo(json.dumps({"schema": "ucp.ls", "schema_version": SCHEMA_VERSION,
                               "url": display_url(url),
                               "steps": [s.to_dict(now) for s in steps]}, indent=1))
    elif not steps:
        from ucp.native._steps import describe_other

        what = describe_other(url, storage_options=so)
        click.echo(f"{display_url(url)}: no step directories" + (
            "" if what is None else f"; this is {what}: `ucp inspect {display_url(url)}` shows it"))
    else:
        click.echo(format_steps(url, steps))


# -- text output ----------------------------------------------------------------------------------

def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{s}s ago"



def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]], right: set[int]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def format_steps(url: str, steps: list[StepRow], *, now: float | None = None) -> str:
    """The ``ucp ls`` table."""
    now = time.time() if now is None else now
    if not steps:
        return f"{display_url(url)}: no step directories"
    rows = [(str(s.step), "committed" if s.committed else "uncommitted", human_bytes(s.bytes),
             _age(None if s.created is None else now - s.created), "latest" if s.latest else "")
            for s in steps]
    return "\n".join(_table(("STEP", "STATUS", "SIZE", "AGE", ""), rows, {0, 2}))


def format_report(r: Report) -> str:
    """The human-readable ``ucp inspect`` output: summary lines, parameter table, totals."""
    t = r.totals()
    lines = [f"{display_url(r.url)}: {r.description}",
             f"  format      {r.format}" + (f" (written by {r.engine})" if r.engine and
                                             r.engine != r.format else ""),
             f"  step        {'-' if r.step is None else r.step}",
             f"  commit      {r.commit}",
             f"  topology    {r.topology if r.topology is not None else '-'}"
             + ("" if r.world_size is None else
                f" ({r.world_size} rank{'s' if r.world_size != 1 else ''})"),
             f"  spec        {r.spec or '-'}"]
    if r.files is not None:
        lines.append(f"  files       {r.files} ({human_bytes(r.size_on_disk)})")
    if r.steps is not None:
        done = sum(s.committed for s in r.steps)
        lines.append(f"  steps       {done} committed, {len(r.steps) - done} uncommitted")
    if r.params:
        lines.append("")
        rows = [(p.name, "[" + ", ".join(map(str, p.shape)) + "]", p.dtype, ",".join(p.states),
                 human_bytes(p.bytes)) for p in r.params]
        lines += _table(("NAME", "SHAPE", "DTYPE", "STATES", "BYTES"), rows, {4})
    if r.buffers:
        lines.append("")
        rows = [(b.name, "[" + ", ".join(map(str, b.shape)) + "]", b.dtype, human_bytes(b.bytes))
                for b in r.buffers]
        lines += _table(("BUFFER", "SHAPE", "DTYPE", "BYTES"), rows, {3})
    lines.append("")
    approx = "" if r.bytes_exact else "~"
    lines.append(f"total: {t['params']} parameters ({t['frozen']} frozen), {t['elements']:,} "
                 f"elements, {approx}{human_bytes(t['bytes'])}; {t['buffers']} buffers "
                 f"({human_bytes(t['buffer_bytes'])})")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)
