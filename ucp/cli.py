"""The ``ucp`` command line: one click group, one short function per command.

Errors a user can act on print one line ``Error: ...`` and exit 1; usage errors exit 2;
``--verbose`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from typing import Any, Callable

import click

from ._errors import UcpError

__all__ = ["main", "ucp_command", "progress_enabled", "add_secrets", "redact"]


def ucp_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turns an error raised by a command into one line ``Error: ...`` and exit 1.

    A :class:`UcpError` shows its message; any other exception (a bug, or an error of a library
    underneath) shows its type and message. ``--verbose`` adds the traceback. Secrets given as
    storage options (:func:`add_secrets`), AWS secrets in the environment, and ``user:pass@`` in
    URLs are replaced by ``***``.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the CLI boundary: every error becomes one line
            ctx = click.get_current_context(silent=True)
            verbose = ctx is not None and bool((ctx.find_root().params or {}).get("verbose"))
            if verbose:
                click.echo(redact(traceback.format_exc(), ctx).rstrip("\n"), err=True)
            lines = str(e).strip().splitlines() or [""]
            text = lines[0] if isinstance(e, UcpError) else f"{type(e).__name__}: {lines[0]}"
            if not verbose and (len(lines) > 1 or not isinstance(e, UcpError)):
                text += " (--verbose shows more)"
            raise click.ClickException(redact(text, ctx)) from e

    return wrapper


_SECRET_KEYS = ("secret", "token", "password", "passwd", "credential", "key", "auth", "sas",
                "signature")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_KEY",
               "AZURE_STORAGE_SAS_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def add_secrets(ctx: click.Context | None, options: Any) -> None:
    """Remembers the secret-looking values of ``options`` (storage options) for :func:`redact`."""
    if ctx is None:
        return
    found = ctx.find_root().meta.setdefault("ucp.secrets", set())

    def visit(obj: Any, key: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, str(k))
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, key)
        elif isinstance(obj, str) and len(obj) >= 4 and any(s in key.lower() for s in _SECRET_KEYS):
            found.add(obj)
    visit(options, "")


def redact(text: str, ctx: click.Context | None = None) -> str:
    """``text`` without known secrets or URL user-info."""
    secrets = set(ctx.find_root().meta.get("ucp.secrets", ())) if ctx is not None else set()
    secrets.update(v for v in (os.environ.get(k) for k in _SECRET_ENV) if v and len(v) >= 4)
    for s in sorted(secrets, key=len, reverse=True):
        text = text.replace(s, "***")
    return _USERINFO.sub(r"\1***@", text)


def progress_enabled(quiet: bool = False) -> bool:
    """Whether a command shows a progress bar: not with ``--quiet`` (the command's or
    ``ucp --quiet``), and only when stderr is a terminal."""
    ctx = click.get_current_context(silent=True)
    root_quiet = ctx is not None and bool((ctx.find_root().params or {}).get("quiet"))
    return not (quiet or root_quiet) and sys.stderr.isatty()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Print the full traceback on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (also off when stderr is "
              "not a terminal).")
@click.version_option(package_name="ucp")
def main(verbose: bool, quiet: bool) -> None:
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
from . import _cli_inspect  # noqa: E402,F401 - inspect, verify, export, ls
from . import _cli_reshard  # noqa: E402,F401 - registers `reshard`
from . import _cli_diff  # noqa: E402,F401 - registers `diff`
