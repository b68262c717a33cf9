"""The ``ucp`` command line: one click group, one short function per command.

Errors a user can act on print one line ``Error: ...`` and exit 1; usage errors exit 2;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from typing import Any, Callable

import click

from ._errors import UcpError

__all__ = ["main", "ucp_command"]


def ucp_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns a :class:`UcpError` raised by a command into ``Error: ...`` and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UcpError as e:
            ctx = click.get_current_context(silent=True)
            if ctx is not None and (ctx.find_root().params or {}).get("verbose"):
                traceback.print_exc(file=sys.stderr)
            raise click.ClickException(str(e)) from e

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Print the full traceback on errors.")
@click.version_option(package_name="ucp")
def main(verbose: bool) -> None:
    """Universal checkpointing for distributed PyTorch training.

    \b
    Example:
      ucp --help
    """
    log = logging.getLogger("ucp")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler())
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


class _StderrHandler(logging.Handler):
    """What ucp finds and does goes to the current stderr; results go to stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


from . import _cli_commands  # noqa: E402,F401 - registers the commands on `main`
from ._cli_spec import spec as _spec_group  # noqa: E402
main.add_command(_spec_group)
from . import _cli_reshard  # noqa: E402,F401 - registers `reshard`
