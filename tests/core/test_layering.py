"""The package layout's one-way dependencies (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: folder -> its import name, as pyproject.toml maps them
PACKAGES = {"ucp": "ucp", "grammar": "ucp.grammar", "storage": "ucp.storage", "resharder": "ucp.resharder"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    name = ".".join([PACKAGES[parts[0]], *parts[1:]])
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every ucp module ``path`` imports (relative imports resolved, function-level ones too)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found.update([target] + names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n == "ucp" or n.startswith("ucp.")}


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return name == "ucp" or any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("folder,allowed", [
    ("ucp/core", ("ucp.core",)),
    ("grammar", ("ucp.core", "ucp.grammar")),
    ("storage", ("ucp.core", "ucp.storage")),
    # the resharder: the leaf, grammar, storage and the read protocol; sources are opened
    # (universal, or an engine by detection) only inside open_array_source / get_target
    ("resharder", ("ucp.core", "ucp.grammar", "ucp.storage", "ucp.resharder", "ucp.engines._base",
                   "ucp.engines._open", "ucp.engines._registry", "ucp.universal")),
])
def test_dependencies_point_one_way(folder, allowed):
    bad = {f"{p.relative_to(ROOT)} imports {n}" for p in _files(folder) for n in _imports(p)
           if not _allowed(n, allowed)}
    assert not bad, sorted(bad)


def test_the_resharder_never_imports_save_convert_hooks_or_the_cli():
    forbidden = ("ucp.ops", "ucp.cli", "ucp.native", "ucp.engines.deepspeed", "ucp.engines.dcp")
    bad = {f"{p.relative_to(ROOT)} imports {n}" for p in _files("resharder") for n in _imports(p)
           if _allowed(n, forbidden) and n != "ucp"}
    assert not bad, sorted(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path, monkeypatch):
    """The rule above can fail: a resharder module importing the save is reported."""
    fake = ROOT / "resharder" / "_layering_probe.py"
    try:
        fake.write_text("from ucp.native._save import save\n")
        assert "ucp.native._save" in _imports(fake)
        assert not _allowed("ucp.native._save", ("ucp.core", "ucp.grammar"))
    finally:
        fake.unlink()


@pytest.mark.parametrize("module,absent", [
    ("ucp.core", "torch"),
    ("ucp.grammar", "torch.distributed"),
    ("ucp.storage", "torch.distributed"),
])
def test_leaf_packages_import_light(module, absent):
    code = f"import sys, {module}; print({absent!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", f"import {module} imports {absent}"


@pytest.mark.parametrize("folder", ["ucp/native", "ucp/universal", "ucp/engines", "ucp/core"])
def test_formats_and_engines_never_import_the_commands(folder):
    bad = {f"{p.relative_to(ROOT)} imports {n}" for p in _files(folder) for n in _imports(p)
           if _allowed(n, ("ucp.ops", "ucp.cli")) and n != "ucp"}
    assert not bad, sorted(bad)
