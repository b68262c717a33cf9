"""The demo is the fault-tolerance story: a rank SIGKILLed mid-training, the job restarted on the
surviving ranks with another layout, resumed from the newest committed step, same curve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from ucp.testing import scaled_timeout

ROOT = Path(__file__).resolve().parents[2]


def test_demo_survives_a_lost_rank_and_resumes_on_fewer(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=scaled_timeout(600))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "the job died" in out
    # which steps were committed when the rank died depends on how far the async saves got
    committed = [int(s) for s in re.findall(r"'step-(\d{8})'", out.split("committed:")[1].splitlines()[0])]
    assert committed and max(committed) <= 20
    resumed = int(re.search(r"resumed step (\d+): dp=2,tp=2,pp=1,zero=0 -> dp=3,tp=1,pp=1,zero=0", out).group(1))
    assert resumed == max(committed)  # the newest committed step, never a partial one
    worst = float(out.split("max relative difference")[1].split()[0])
    assert worst <= 1e-5
    # the step the rank was lost at is said as such, apart from the step resumed from
    assert "a rank was SIGKILLed at step 23; the job died" in out
    table = out.split("3 ranks\n", 1)[1].split("\n\n", 1)[0].splitlines()
    # columns: step, uninterrupted, the killed 4-rank run, the resumed 3-rank run, a remark
    rows = {int(r[:4]): (r[6:19].strip(), r[21:30].strip(), r[32:41].strip(), r[41:].strip())
            for r in table}
    assert rows[resumed][3] == "<- newest committed step" and rows[resumed + 1][3] == "<- resumed here"
    assert rows[23][3] == "<- a rank is SIGKILLed"
    # the killed run's steps past the checkpoint (logged up to 22) are shown next to the resumed run's
    for step in range(resumed + 1, 23):
        ref, killed, again = (float(v) for v in rows[step][:3])
        assert killed == ref and abs(again - ref) <= 1e-5 * abs(ref), step
    assert rows[23][1] == rows[40][1] == "" and rows[40][2] != ""
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_demo_says_how_to_install_matplotlib_before_it_trains(tmp_path):
    out = tmp_path / "demo"
    code = ("import runpy, sys; sys.modules['matplotlib'] = None; "  # as if it were not installed
            f"sys.argv = ['demo.py', '--out', {str(out)!r}]; "
            f"runpy.run_path({str(ROOT / 'examples' / 'demo.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=scaled_timeout(60))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.strip() == ("the demo draws its loss curve with matplotlib, which is not "
                                   "installed: pip install 'ucp[demo]' (or matplotlib), then run "
                                   "it again")
    assert not out.exists()
