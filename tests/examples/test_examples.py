"""Every example under examples/ runs, as the README shows it, and checks its own result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.testing import scaled_timeout

ROOT = Path(__file__).resolve().parents[2]


def test_save_load_example(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    out = tmp_path / "ckpt"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "save_load.py"), "--out", str(out), "--steps", "20"],
                          capture_output=True, text=True, timeout=scaled_timeout(300), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "every shard equal bit for bit: True" in proc.stdout
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == \
        ["step-00000010", "step-00000020"]
    # the optimizer state is keyed by parameter names: the checkpoint inspects and converts
    assert CliRunner().invoke(main, ["inspect", str(out)]).exit_code == 0
    r = CliRunner().invoke(main, ["convert", str(out), str(tmp_path / "universal")])
    assert r.exit_code == 0, r.output
    universal = ucp.open(str(tmp_path / "universal"))
    assert universal.step == 20 and universal.info("up.weight").shape == (1024, 256)
    assert {"fp32", "exp_avg", "exp_avg_sq"} <= set(universal.info("up.weight").states)


def test_convert_torchrun_example(tmp_path):
    """examples/convert_torchrun.py: two ranks convert one checkpoint; values bit for bit."""
    g = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.randn(64, 32, generator=g) for i in range(6)}
    optim = {"state": {k: {"exp_avg": v * 2} for k, v in model.items()},
             "param_groups": [{"params": sorted(model), "lr": 0.1}]}
    ucp.save({"model": model, "optim": optim}, str(tmp_path / "ckpt"), step=7).wait()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "examples" / "convert_torchrun.py"), str(tmp_path / "ckpt"),
                           str(tmp_path / "universal")],
                          capture_output=True, text=True, timeout=scaled_timeout(300), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1: step 7, 6 parameters" in proc.stdout
    universal = ucp.open(str(tmp_path / "universal"))
    for name, value in model.items():
        assert torch.equal(universal.read(name, "fp32"), value)
        assert torch.equal(universal.read(name, "exp_avg"), value * 2)
