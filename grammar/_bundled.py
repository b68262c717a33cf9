"""Specs shipped with ucp (``grammar/specs/*.ucl``)."""

from __future__ import annotations

from importlib import resources
from ._error import UclError

# ``bundled_spec`` (a loaded Spec) lives in ``_spec``: :func:`~ucp.grammar.load_spec` resolves
# bundled names too, and this module stays below ``_spec`` (no import cycle).
__all__ = ["bundled_spec_names", "bundled_spec_text"]


def bundled_spec_names() -> tuple[str, ...]:
    """The names of the bundled specs, e.g. ``("gpt2", "llama_hf", "llama_megatron", "mixtral_moe")``."""
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
