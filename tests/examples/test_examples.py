"""Every example under examples/ runs, as the README shows it, and checks its own result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ucp.testing import scaled_timeout

ROOT = Path(__file__).resolve().parents[2]


def test_save_load_example(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "save_load.py"), "--out", str(tmp_path), "--steps", "20"],
                          capture_output=True, text=True, timeout=scaled_timeout(300), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every shard equal bit for bit: True" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step-")) == \
        ["step-00000010", "step-00000020"]
