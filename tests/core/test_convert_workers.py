"""``ucp convert --workers N``: the worker processes end when their parent is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import ucp
from ucp.testing import pid_alive


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids |= {int(k) for k in f.read().split()}
    return kids



@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    ucp.save({f"p{i}": torch.randn(64, 64) for i in range(40)}, tmp_path / "src", step=1).wait()
    parent = subprocess.Popen([sys.executable, "-c", "from ucp.cli import main; main()", "convert", str(tmp_path / "src"),
                               str(tmp_path / "dst"), "--workers", "2", "-q"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.monotonic() + 60, set()
        while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
            workers = _children(parent.pid)
            time.sleep(0.05)
        assert len(workers) >= 2, "the workers never started"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 60
    while any(pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [w for w in workers if pid_alive(w)]
    for w in left:  # do not leave them behind when the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their killed parent"
