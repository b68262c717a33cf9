"""Specs shipped with ucp (``grammar/specs/*.ucl``)."""

from __future__ import annotations

from importlib import resources
from typing import Mapping

from ._error import UclError
from ._parse import parse
from ._spec import Spec, from_ast

__all__ = ["bundled_spec", "bundled_spec_names", "bundled_spec_text"]


def bundled_spec_names() -> tuple[str, ...]:
    """The names of the bundled specs, e.g. ``("gpt2", "llama_megatron", "mixtral_moe")``."""
    folder = resources.files(__package__).joinpath("specs")
    return tuple(sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".ucl")))


def bundled_spec_text(name: str) -> str:
    """The text of bundled spec ``name``.

    Raises:
        UclError: when there is no such bundled spec (the message lists those there are).
    """
    names = bundled_spec_names()
    if name not in names:
        raise UclError(f"no bundled spec named {name!r}; bundled: {', '.join(names)}")
    return resources.files(__package__).joinpath("specs", f"{name}.ucl").read_text(encoding="utf-8")


def bundled_spec(name: str, *, constants: Mapping[str, int] | None = None) -> Spec:
    """Loads bundled spec ``name``, with ``constants`` overriding its defaults.

    Example:
        >>> spec = bundled_spec("llama_megatron", constants={"num_layers": 16})
        >>> spec.constants["head_dim"]
        128
    """
    return from_ast(parse(bundled_spec_text(name), source=f"{name}.ucl"), constants)
