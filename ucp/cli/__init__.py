"""The ``ucp`` command line: one click group, one short function per command.

Errors a user can act on print one line ``Error: ...`` and exit 1; usage errors exit 2;
``--verbose`` adds the traceback.

The commands live in ``ucp._cli_*`` modules, which import only :mod:`ucp.cli._base` (no import
cycle); each imports the library (torch, zarr, the engines) inside its function, so ``--help``,
``--version``, usage errors and ``ucp ls`` never import torch.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import click

from ucp.cli._base import StderrHandler, add_secrets, cli_terms, progress_enabled, redact, ucp_command
from ucp.cli._commands import convert
from ucp.cli._diff import diff
from ucp.cli._inspect import export, inspect, ls, verify
from ucp.cli._reshard import reshard
from ucp.cli._spec import spec
from ucp.storage import keep_freed_memory

__all__ = ["main", "ucp_command", "progress_enabled", "add_secrets", "redact", "cli_terms"]

#: The shell's exit status for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


class _Interrupted(click.ClickException):
    exit_code = EXIT_INTERRUPTED


class _Group(click.Group):
    """The ``ucp`` group: Ctrl-C ends any command with one line and exit status 130 (click's
    own ``Aborted!`` exits 1, which scripts cannot tell from a failure)."""

    def invoke(self, ctx: click.Context) -> object:
        seen: list[int] = []
        previous = _watch_sigint(seen)
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted("interrupted (Ctrl-C)") from e
        except click.ClickException as e:
            # Ctrl-C inside an extension module's import (numpy's, under torch's) surfaces as an
            # ImportError, not a KeyboardInterrupt: any failure after a SIGINT is the interrupt
            if seen and not isinstance(e, _Interrupted):
                raise _Interrupted("interrupted (Ctrl-C)") from e
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def _watch_sigint(seen: list[int]) -> Any:
    """Records SIGINTs in ``seen`` (still raising KeyboardInterrupt); returns the handler to put
    back, or None when signals cannot be handled here (not the main thread, or a custom one)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        signal.default_int_handler(signum, frame)
    return signal.signal(signal.SIGINT, handler)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Print the full traceback on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars (also off when stderr is "
              "not a terminal).")
@click.version_option(package_name="ucp")
def main(verbose: bool, quiet: bool) -> None:
    """Universal checkpointing for distributed PyTorch training.

    \b
    Examples:
      ucp ls ./ckpt                                  # steps, commit status, sizes
      ucp inspect ./ckpt                             # what a checkpoint holds
      ucp convert ./ds_ckpt ./universal              # ucp/DeepSpeed/DCP -> universal
      ucp reshard ./universal ./ckpt_dp4 --to dp=4,zero=1
      ucp export ./universal ./hf --dtype bf16       # Hugging Face safetensors
      ucp COMMAND --help                             # each command's options
    """
    keep_freed_memory()  # this process moves gigabytes through short-lived tensors
    log = logging.getLogger("ucp")
    if not any(isinstance(h, StderrHandler) for h in log.handlers):
        log.addHandler(StderrHandler())
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


for _command in (convert, reshard, inspect, verify, export, ls, spec, diff):
    main.add_command(_command)
