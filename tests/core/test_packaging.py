"""pyproject.toml builds without setuptools' deprecations: an SPDX license string, every folder
that ships files listed as a package, and the extras the README's commands need."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_license_is_an_spdx_expression():
    # a TOML table ({text = ...}) is deprecated; setuptools stops building it in Feb 2027
    assert _pyproject()["project"]["license"] == "Apache-2.0"


def test_every_folder_inside_a_package_is_a_listed_package():
    tool = _pyproject()["tool"]["setuptools"]
    packages, dirs = set(tool["packages"]), tool["package-dir"]
    for package in sorted(packages):
        top = max((p for p in dirs if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / dirs[top] / package[len(top):].lstrip(".").replace(".", "/")
        assert folder.is_dir(), package
        for sub in folder.iterdir():
            if sub.is_dir() and sub.name != "__pycache__" and not sub.name.endswith(".egg-info"):
                assert f"{package}.{sub.name}" in packages, f"{sub} ships files but is not listed"
    assert tool["package-data"]["ucp.grammar.specs"] == ["*.ucl"]


def test_files_read_at_run_time_are_package_data():
    """Non-Python files a module opens beside itself ship in the wheel (the fingerprint kernel's
    C source is compiled on first use from the installed copy)."""
    data = _pyproject()["tool"]["setuptools"]["package-data"]
    assert "*.c" in data["ucp.core"] and (ROOT / "ucp" / "core" / "_fpkernel.c").is_file()


def test_the_demo_extra_installs_what_the_demo_imports():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["demo"])
    assert "demo" in (ROOT / "Makefile").read_text().split("pip install -q -e '.[")[1].split("]")[0]
