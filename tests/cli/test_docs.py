"""Every ``$ ucp ...`` line of docs/cli.md runs, in order, and prints what the page shows.

Expected output is compared like a doctest with ELLIPSIS and NORMALIZE_WHITESPACE: ``...``
matches any text. The exit status must be 2 when the output shows ``Usage:``, 1 when a line
starts with ``Error:``, else 0.

Every link of the README and of docs/ names a file (and heading) inside the repository.
"""

from __future__ import annotations

import doctest
import re
import shlex
import shutil
from pathlib import Path

from click.testing import CliRunner

import ucp
from ucp.cli import main

from ._sample import gpt2_state, training_state

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
_BLOCK = re.compile(r"^```console\n(.*?)^```", re.S | re.M)


def doc_commands(text: str) -> list[tuple[str, str]]:
    """(command line, expected output) for every ``$ `` line of the console blocks."""
    out: list[tuple[str, str]] = []
    for block in _BLOCK.findall(text):
        for line in block.splitlines(keepends=True):
            if line.startswith("$ "):
                out.append((line[2:].strip(), ""))
            else:
                assert out, f"output before any command in docs/cli.md:\n{block}"
                out[-1] = (out[-1][0], out[-1][1] + line)
    return out


def expected_exit(output: str) -> int:
    if "Usage:" in output:
        return 2
    return 1 if any(line.startswith("Error:") for line in output.splitlines()) else 0


def test_the_parser_finds_the_examples():
    commands = doc_commands(DOC.read_text())
    assert len(commands) >= 15
    assert all(cmd.startswith("ucp ") for cmd, _ in commands)
    names = {shlex.split(cmd)[1] for cmd, _ in commands}
    assert names >= {"ls", "inspect", "verify", "export", "convert", "reshard", "spec"}


def test_every_command_in_docs_cli_md(sample, tmp_path, s3_url, monkeypatch):
    url, opts = s3_url
    bucket = url.removeprefix("s3://").split("/")[0]
    ucp.save(training_state(gpt2_state()), f"s3://{bucket}/run1", step=200,
             storage_options=opts).wait()
    work = tmp_path / "work"
    shutil.copytree(sample, work)
    monkeypatch.chdir(work)
    checker, flags = doctest.OutputChecker(), doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    runner = CliRunner()
    for cmd, want in doc_commands(DOC.read_text()):
        args = shlex.split(cmd.replace("s3://my-bucket", f"s3://{bucket}"))
        result = runner.invoke(main, args[1:], prog_name="ucp")
        got = result.output
        assert checker.check_output(want, got, flags), (
            f"docs/cli.md: `{cmd}` prints\n{got}\nbut the page shows\n{want}")
        assert result.exit_code == expected_exit(want), (cmd, result.exit_code, got)


# -- links of the README and docs/ -----------------------------------------------------------------

ROOT = DOC.parents[1]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.M)
_CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.S | re.M)


def _anchors(text: str) -> set[str]:
    """GitHub's anchors of a markdown page's headings."""
    heads = re.findall(r"^#+\s+(.*?)\s*$", _CODE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def broken_links(page: Path, root: Path) -> list[str]:
    """The links of ``page`` that leave ``root``, name a missing file, or a missing heading."""
    text = page.read_text(encoding="utf-8")
    bad = []
    for m in _LINK.finditer(_CODE.sub("", text)):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http://, mailto: ...: not a repository file
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.is_relative_to(root.resolve()):
            bad.append(f"{target} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text("utf-8")):
            bad.append(f"{target} (no such heading)")
    return bad


def test_every_link_of_the_readme_and_docs_stays_in_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert ROOT / "docs" / "architecture.md" in pages and ROOT / "docs" / "benchmarks.md" in pages
    found = {str(p.relative_to(ROOT)): broken_links(p, ROOT) for p in pages}
    assert not {p: b for p, b in found.items() if b}, found
    readme = (ROOT / "README.md").read_text()
    assert "(docs/architecture.md)" in readme and "(docs/benchmarks.md)" in readme


def test_a_link_outside_the_repository_or_to_a_missing_file_is_found(tmp_path):
    (tmp_path / "repo" / "docs").mkdir(parents=True)
    (tmp_path / "outside.md").write_text("# x\n")
    page = tmp_path / "repo" / "docs" / "page.md"
    page.write_text("# Title here\n[a](../../outside.md) [b](missing.md) [c](#title-here)\n"
                    "[d](https://example.com/x) `[e](gone.md)` [f](page.md#nope)\n")
    assert broken_links(page, tmp_path / "repo") == [
        "../../outside.md (outside the repository)", "missing.md (no such file)",
        "page.md#nope (no such heading)"]
