"""``ucp spec ...``: lint UCL specs from the command line.

Registered on the main group by :mod:`ucp.cli`. The library does the work (the grammar is
imported by the command itself); this module only reads a checkpoint's parameter names and
shapes (:func:`parameter_shapes`) and prints findings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ucp.cli._base import TopologyType, ucp_command
from ucp.core._errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.core._topology import Topology

if TYPE_CHECKING:  # the grammar (lark) is imported by the command itself
    from ucp.grammar import Problem, Spec, UclError

__all__ = ["spec", "parameter_shapes"]


def parameter_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a checkpoint, without reading any tensor data.

    Understands a ``.safetensors`` file (its header only), a directory of ``*.safetensors``
    files (e.g. a sharded Hugging Face checkpoint), and a ``.json`` file mapping each name to
    its shape (``{"wte.weight": [50257, 768], ...}``). New formats are added here.

    Raises:
        CheckpointNotFoundError: when the path does not exist or a directory holds no
            safetensors file.
        CorruptCheckpointError: on an unreadable file, a malformed JSON mapping, a name given
            two different shapes, or a format this function does not know.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointNotFoundError(f"{p}: no *.safetensors file in this directory")
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            for name, shape in _safetensors_shapes(f).items():
                if shapes.setdefault(name, shape) != shape:
                    raise CorruptCheckpointError(f"{f}: {name!r} has shape {list(shape)} here and "
                                                 f"{list(shapes[name])} in another file")
        return shapes
    if not p.exists():
        raise CheckpointNotFoundError(f"{p}: no such file or directory")
    if p.suffix == ".safetensors":
        return _safetensors_shapes(p)
    if p.suffix == ".json":
        return _json_shapes(p)
    raise CorruptCheckpointError(f"{p}: cannot list parameters of this file; give a .safetensors "
                                 "file, a directory of them, or a .json file mapping names to shapes")


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _json_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object mapping names to shapes")
    out = {}
    for name, shape in data.items():
        if not (isinstance(shape, list) and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise CorruptCheckpointError(f"{path}: the shape of {name!r} must be a list of sizes "
                                         f"such as [4096, 1024], got {shape!r}")
        out[name] = tuple(shape)
    return out


class _Assignment(click.ParamType):
    """``NAME=INT`` for ``--set``."""

    name = "NAME=VALUE"

    def convert(self, value, param, ctx):
        name, sep, number = str(value).partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError(value)
            return name.strip(), int(number)
        except ValueError:
            self.fail(f"{value!r} is not NAME=INTEGER, e.g. num_layers=24", param, ctx)


def _load(file: str, constants: dict[str, int]) -> Spec:
    """FILE of ``spec check``: an existing file, else a bundled name (never UCL text: a word
    that is neither is reported as such)."""
    from ucp.grammar import load_spec

    return load_spec(Path(file) if Path(file).is_file() else file, constants=constants)


@click.group("spec")
def spec() -> None:
    """Work with UCL specs (see docs/ucl.md)."""


@spec.command("check")
@click.argument("file")
@click.option("--against", type=click.Path(exists=True), metavar="CKPT",
              help="A .safetensors file, a directory of them, or a JSON file mapping canonical "
                   "parameter names to shapes.")
@click.option("--topology", type=TopologyType(), default=None,
              help="Also check that every shape splits on this topology, e.g. tp=4,pp=2.")
@click.option("--set", "assignments", type=_Assignment(), multiple=True,
              help="Override a constant of the spec, e.g. --set num_layers=24 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@ucp_command
def check(file: str, against: str | None, topology: Topology | None,
          assignments: tuple[tuple[str, int], ...], as_json: bool) -> None:
    """Lint the spec FILE (a path, or the name of a bundled spec such as llama_megatron).

    Parses the spec and, with --against, reports parameters no rule covers, rules that match no
    parameter, and shapes that do not fit their rule. Exit status 0 when all is well, 1 when
    not.

    \b
    Example:
      ucp spec check llama.ucl --against model.safetensors --topology tp=4,pp=2
      ucp spec check gpt2 --against shapes.json --set num_layers=24
    """
    from ucp.grammar import UclError

    try:
        loaded = _load(file, dict(assignments))
    except UclError as e:
        if as_json:
            _report_error(file, e)
        # once, on stderr: where, what, and the offending line with a caret
        raise click.ClickException(str(e)) from e
    problems, count = [], None
    if against is not None:
        shapes = parameter_shapes(against)
        count = len(shapes)
        problems = loaded.check(shapes, topology=topology)
    _report(file, problems, as_json)
    if problems:
        raise click.ClickException(f"{file}: {len(problems)} problem(s) against {against}")
    if not as_json:
        what = f"{count} parameters covered" if count is not None else "syntax ok"
        click.echo(f"{file}: ok ({len(loaded.rules)} rules, {what})")


def _report(file: str, problems: list[Problem], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"spec": file, "ok": not problems, "problems": [
            {"kind": p.kind, "message": p.message, "line": p.line, "param": p.param}
            for p in problems]}, indent=1))
        return
    for p in problems:
        where = file if p.line is None else f"{file}:{p.line}"
        click.echo(f"{where}: {p.kind}: {p.message}")


def _report_error(file: str, e: UclError) -> None:
    """A spec that does not load, as the ``--json`` document on stdout."""
    click.echo(json.dumps({"spec": file, "ok": False, "error": {
        "message": e.message, "line": e.line, "column": e.column}}, indent=1))
