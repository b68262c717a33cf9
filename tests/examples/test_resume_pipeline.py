"""Loss continuity across pipeline layouts: train 20 steps with pipeline parallelism
(torch.distributed.pipelining, saving at 10), resume at 10 without pipelining; steps 11-20 match
the uninterrupted run within 1e-5 relative. Each stage saved its parameters under their global
names, so the one-stage model reads every tensor whole from the two stages' files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ucp.testing import scaled_timeout

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "examples" / "train_pipeline.py"


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(ROOT / "examples")}
    proc = subprocess.run([str(torchrun_bin), "--standalone", "--nproc_per_node", str(nproc), str(TRAIN), *args],
                          capture_output=True, text=True, timeout=scaled_timeout(600), env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(log: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, log.read_text().splitlines())}


SCENARIOS = {
    "pp2->pp1": ((2, ["--pp", "2"]), (1, ["--pp", "1"])),
    "pp2xdp2->pp1xdp2": ((4, ["--pp", "2"]), (2, ["--pp", "1"])),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_loss_curve_continues_from_pipeline_to_plain(tmp_path, name):
    (na, a), (nb, b) = SCENARIOS[name]
    ckpt, ref_log, log = tmp_path / "ckpt", tmp_path / "ref.jsonl", tmp_path / "resumed.jsonl"
    torchrun(na, *a, "--ckpt", str(ckpt), "--steps", "20", "--loss-log", str(ref_log))
    shutil.rmtree(ckpt / "step-00000020")  # as if the job had died after committing step 10
    out = torchrun(nb, *b, "--ckpt", str(ckpt), "--steps", "20", "--loss-log", str(log))
    assert "resumed step 10" in out.stderr + out.stdout
    assert "pp=2" in out.stderr + out.stdout  # resharded from the pipelined layout
    ref, got = losses(ref_log), losses(log)
    assert sorted(ref) == list(range(1, 21)) and sorted(got) == list(range(11, 21))
    for step in range(11, 21):
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])
