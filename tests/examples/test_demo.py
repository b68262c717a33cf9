"""The demo is the fault-tolerance story: a rank SIGKILLed mid-training, the job restarted on the
surviving ranks with another layout, resumed from the newest committed step, same curve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_survives_a_lost_rank_and_resumes_on_fewer(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "the job died" in out and "'step-00000020'" in out
    assert "resumed step 20: dp=2,tp=2,pp=1,zero=0 -> dp=3,tp=1,pp=1,zero=0" in out
    worst = float(out.split("max relative difference")[1].split()[0])
    assert worst <= 1e-5
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
