"""``ucp.deepspeed.Checkpointer`` on a live DeepSpeed ZeRO-2 bf16 engine, 2 CPU ranks.

- maybe_save blocks only for the snapshot: the save's write is held back on the save worker
  thread, and maybe_save still returns, its save pending (a synchronous save would hang until the
  hold times out and then return a finished save);
- training on while the save is in flight does not reach the files: the committed step equals the
  values at save time bit for bit (fp32 partitions, optimizer states, weights);
- a save due while one is in flight is skipped on every rank (``overlap="skip"``);
- a rank SIGKILLed in the middle of a save leaves the previous step committed and loadable: a
  new job resumes from it with the engine's state equal to it bit for bit, and saves again over
  the debris;
- a resume on 3 ranks of a 2-rank save loads each rank's partitions straight into the engine,
  bit for bit, reading at most 1.10x the bytes the ranks hold.

The 2 -> 3 and 2 -> 2 resumes with the loss curve are tests/examples/test_deepspeed_resume.py.
See tests/examples/_deepspeed_hook_worker.py for what each rank checks.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ucp.testing import scaled_timeout, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_deepspeed_hook_worker.py")

pytest.importorskip("deepspeed", reason="install DeepSpeed 0.19.8 to run the DeepSpeed hook tests")


def torchrun(nproc: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = subprocess_env({"PYTHONPATH": str(ROOT / "examples"), **(env or {})})
    env.pop("UCP_FAILPOINT", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(WORKER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=scaled_timeout(300), env=env)


def ok_ranks(proc: subprocess.CompletedProcess, mode: str) -> dict[int, dict]:
    found = re.findall(rf"^OK {mode} (\d+) (\{{.*\}})$", proc.stdout, flags=re.M)
    return {int(rank): json.loads(result) for rank, result in found}


def test_maybe_save_returns_after_staging_and_saves_the_values_of_its_step(tmp_path):
    proc = torchrun(2, "async", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = ok_ranks(proc, "async")
    assert sorted(results) == [0, 1], proc.stdout[-3000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step-")) == ["step-00000002"]
    # `ucp convert` recognises the snapshot and lays the ZeRO partitions out per parameter
    import torch

    import ucp
    from ucp.engines.deepspeed._snapshot import DeepSpeedSnapshot
    from ucp.engines import detect_engine

    assert "DeepSpeedCheckpointer snapshot" in detect_engine(str(tmp_path / "ckpt"))[1]
    snap = DeepSpeedSnapshot(str(tmp_path / "ckpt"), 2)
    uni = ucp.convert(str(tmp_path / "ckpt"), str(tmp_path / "universal"), progress=False)
    assert uni.names() == snap.names() and uni.engine == "deepspeed-snapshot" and uni.step == snap.step
    for name in snap.names():
        info = snap.info(name)
        for state in info.states:
            want, got = snap.read(name, state), uni.read(name, state)
            assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), \
                (name, state)
    assert set(uni.buffer_names()) == set(snap.buffers())


def test_a_rank_killed_mid_save_leaves_the_previous_step_loadable(tmp_path):
    ckpt = tmp_path / "ckpt"
    crashed = torchrun(2, "crash", str(ckpt))
    assert crashed.returncode != 0, crashed.stdout[-3000:]
    assert "-9" in crashed.stderr or "SIGKILL" in crashed.stderr, crashed.stderr[-3000:]
    assert (ckpt / "step-00000002" / "manifest.json").is_file()
    assert not (ckpt / "step-00000004" / "manifest.json").exists()
    assert (ckpt / "step-00000004" / "rank-00001.safetensors").is_file()  # killed after its data file

    resumed = torchrun(2, "resume", str(ckpt))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert sorted(ok_ranks(resumed, "resume")) == [0, 1], resumed.stdout[-3000:]
    assert (ckpt / "step-00000004" / "manifest.json").is_file()


def test_resume_on_three_ranks_reads_only_each_ranks_partition(tmp_path):
    """ZeRO-2 saved on 2 ranks, resumed on 3: the partitions are loaded straight into the engine,
    each rank reading its own share (and the module it holds whole): at most 1.10x the bytes held."""
    ckpt = tmp_path / "ckpt"
    saved = torchrun(2, "wide_save", str(ckpt))
    assert sorted(ok_ranks(saved, "wide_save")) == [0, 1], saved.stdout[-3000:] + saved.stderr[-5000:]
    resumed = torchrun(3, "reads", str(ckpt))
    results = ok_ranks(resumed, "reads")
    assert sorted(results) == [0, 1, 2], resumed.stdout[-3000:] + resumed.stderr[-5000:]
    read, held = sum(r["read"] for r in results.values()), sum(r["held"] for r in results.values())
    print(f"DeepSpeed ZeRO-2 dp2->dp3: read {read} held {held} amplification {read / held:.3f}")
    assert read / held <= 1.10, (read, held, read / held)
    assert not (ckpt / ".staging").exists()

