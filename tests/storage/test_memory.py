"""keep_freed_memory: freed blocks up to 32 MiB are reused, not handed back and faulted in (and
zeroed by the kernel) again; the ``ucp`` command applies it to its own process."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, sys, torch
from ucp.storage import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rank():  # a resharded rank's state: many blocks alive together, then all freed
    state = [torch.empty(1 << 20).fill_(1.0) for _ in range(40)]  # 40 x 4 MiB
    del state
rank()  # the first round faults its pages in either way
before = faults()
for _ in range(5):
    rank()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    plain, kept = _faults("plain"), _faults("keep")
    # 5 x 160 MiB of fresh pages: 204,800 faults of 4 KiB, fewer where the kernel backs some with
    # transparent huge pages (81,835 seen in a CI run): the point is that they are refaulted at all
    assert plain > 5 * 40 * 1024 // 8, plain
    assert kept < plain / 5, (plain, kept)


def test_the_ucp_command_keeps_freed_memory(monkeypatch):
    from click.testing import CliRunner

    import ucp.cli as cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1))
    CliRunner().invoke(cli.main, ["ls", "/nonexistent-ucp-path"])
    assert calls
