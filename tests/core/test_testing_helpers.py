"""The subprocess helpers of the test suite: DeepSpeed's build lock stays in the virtual
environment, and a run that hangs reports its stderr."""

from __future__ import annotations

import os
import sys
import time

import pytest

from ucp.testing import pid_alive, run_command, subprocess_env


def test_torch_extensions_dir_defaults_to_the_virtual_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    out = run_command([sys.executable, "-c", "import os; print(os.environ['TORCH_EXTENSIONS_DIR'])"],
                      what="probe", timeout=60).stdout.strip()
    assert out == os.path.join(sys.prefix, "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/elsewhere")  # an explicit choice is kept
    assert subprocess_env()["TORCH_EXTENSIONS_DIR"] == "/elsewhere"


def test_a_timeout_reports_stderr_as_text_and_ends_the_whole_tree(tmp_path):
    # a child that starts a grandchild (as torchrun starts ranks), then hangs
    pidfile = tmp_path / "grandchild"
    code = ("import subprocess, sys, time; "
            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pidfile)!r}, 'w').write(str(g.pid)); print('some output', flush=True); "
            "sys.stderr.write('waiting for the build lock\\n'); sys.stderr.flush(); time.sleep(60)")
    start = time.monotonic()
    with pytest.raises(AssertionError) as err:
        run_command([sys.executable, "-c", code], what="a DeepSpeed run", timeout=5)
    assert time.monotonic() - start < 60  # not held until the grandchild ends by itself
    msg = str(err.value)
    assert "a DeepSpeed run timed out after 5s" in msg and "waiting for the build lock" in msg
    assert "some output" in msg and "b'" not in msg
    time.sleep(0.5)
    assert not pid_alive(int(pidfile.read_text())), "the grandchild outlived the timeout"

