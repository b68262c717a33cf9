"""What every ``ucp`` command shares: the error boundary, secret redaction, progress, logging,
and the parameter types and options of more than one command.

The command modules (``ucp._cli_*``) import this module, and :mod:`ucp.cli` imports them: no
cycle. Nothing here imports torch, so ``ucp --help`` and usage errors stay fast.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterable

import click

from ucp.core._errors import TopologyError, UcpError
from ucp.core._topology import Topology

__all__ = ["ucp_command", "progress_enabled", "add_secrets", "redact", "cli_terms", "StderrHandler",
           "TopologyType", "storage_option", "storage_options", "spec_option"]


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
            lines = cli_terms(str(e)).strip().splitlines() or [""]
            text = lines[0] if isinstance(e, UcpError) else f"{type(e).__name__}: {lines[0]}"
            if not verbose and (len(lines) > 1 or not isinstance(e, UcpError)):
                text += " (--verbose shows more)"
            raise click.ClickException(redact(text, ctx)) from e

    return wrapper


# The library's messages name keyword arguments; on the command line they are options.
_KEYWORD_AND_OPTION = re.compile(r"\b[a-z_]+=True \((--[a-z-]+)\)")
_KEYWORDS = {"overwrite=True": "--overwrite"}


def cli_terms(message: str) -> str:
    """``message`` with library keyword arguments said as the command line's options:
    ``pass overwrite=True (--overwrite)`` and ``pass overwrite=True`` become ``pass --overwrite``."""
    message = _KEYWORD_AND_OPTION.sub(r"\1", message)
    for keyword, option in _KEYWORDS.items():
        message = message.replace(keyword, option)
    return message


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


class StderrHandler(logging.Handler):
    """What ucp finds and does goes to the current stderr; results go to stdout."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(record.getMessage(), err=True)


# -- parameter types and options of more than one command ----------------------------------------

class TopologyType(click.ParamType):
    """``dp=..,tp=..,pp=..,zero=..`` parsed into a :class:`~ucp.Topology` (usage error otherwise)."""

    name = "TOPOLOGY"

    def convert(self, value: Any, param: Any, ctx: Any) -> Topology:
        if isinstance(value, Topology):
            return value
        try:
            return Topology.parse(value)
        except TopologyError as e:
            self.fail(str(e), param, ctx)


class _StorageOption(click.ParamType):
    """``KEY=VALUE`` for ``-o``: VALUE is JSON when it parses (numbers, true, {...}), else text;
    a dotted KEY nests (``client_kwargs.endpoint_url=...``)."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        key, sep, text = str(value).partition("=")
        if not sep or not key.strip():
            self.fail(f"{value!r} is not KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000",
                      param, ctx)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return key.strip(), parsed


def storage_options(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any] | None:
    """The fsspec options of ``-o KEY=VALUE`` pairs (dotted keys nested), remembered as secrets
    for :func:`redact`; None when there are none."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    add_secrets(click.get_current_context(silent=True), out)
    return out or None


storage_option = click.option(
    "-o", "--storage-option", "options", type=_StorageOption(), multiple=True,
    help="fsspec storage option KEY=VALUE (repeatable), e.g. -o endpoint_url=http://host:9000; "
         "secrets given here are never printed.")
spec_option = click.option(
    "--spec", default=None,
    help="UCL spec: a bundled name (gpt2, llama_hf, llama_megatron, mixtral_moe), a file, or UCL text; "
         "default: the one stored in the checkpoint.")
