"""Special files where a checkpoint has regular ones: a FIFO would block every reader, and a link
to /dev/zero (stat says 0 bytes, it never ends) would defeat every size bound. Refused at once,
naming the file. Each case runs in a child process with a time and memory limit, so a reader
that still hangs or reads without end fails the test instead of the test run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ucp

_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
import ucp
try:
    {call}
except ucp.UcpError as e:
    print("refused:", type(e).__name__, e)
"""


def _child(call: str) -> str:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(call=call)], capture_output=True,
                         text=True, timeout=60)
    return out.stdout + out.stderr


@pytest.fixture
def native(tmp_path):
    ucp.save({"w": torch.ones(4)}, str(tmp_path / "n"), step=1).wait()
    return tmp_path / "n"


@pytest.mark.parametrize("special", ["fifo", "dev-zero"])
@pytest.mark.parametrize("victim", ["manifest.json", "rank-00000.json", "rank-00000.safetensors"])
def test_special_file_in_a_step_is_refused(native, special, victim):
    path = native / "step-00000001" / victim
    path.unlink()
    if special == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    out = _child(f"ucp.load({str(native)!r}, step=1)")
    assert "refused: UnsafeInputError" in out and victim in out and "not a regular file" in out, out


def test_fifo_as_latest_does_not_hang_ls(native):
    (native / "latest").unlink()
    os.mkfifo(native / "latest")
    out = _child(f"from click.testing import CliRunner; from ucp.cli import main; "
                 f"r = CliRunner().invoke(main, ['ls', {str(native)!r}]); print(r.exit_code, r.output)")
    assert out.startswith("0 ") and "committed" in out, out
