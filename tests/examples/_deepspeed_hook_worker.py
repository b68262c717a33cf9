"""One rank of a DeepSpeed job that exercises ``ucp.deepspeed.Checkpointer`` (run by
tests/examples/test_deepspeed_hook.py under torchrun, with examples/ on PYTHONPATH).

    worker.py async  CKPT   save at step 2 while the writer is held back: maybe_save returns
                            before the write, a save due meanwhile is skipped, and the committed
                            files hold the values of step 2 bit for bit although training went on
    worker.py crash  CKPT   commit step 2, then SIGKILL rank 1 in the middle of saving step 4
    worker.py resume CKPT   resume; the engine's fp32 partitions, optimizer states and counters
                            equal the committed step's bit for bit; train on and save step 4
    worker.py wide_save CKPT  a wider model (1.6M parameters) saved at step 2
    worker.py reads CKPT    resume it on this job's ranks: every state equals the saved one bit for
                            bit (gathered by DeepSpeed's own API); reports bytes read and held

Every check is an assert on the rank that makes it; a rank prints ``OK <mode> <rank> <json>``
at the end, so the test sees which ranks got through.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gpt
import ucp
import ucp.native._save

GLOBAL_BATCH, STEPS = 4, 6


def build_engine(**kw):
    model = gpt.build(seed=0, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // dist.get_world_size(),
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
              "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    return engine


def train_step(engine, step: int) -> None:
    per_rank = GLOBAL_BATCH // dist.get_world_size()
    x, y = gpt.batch(step, dist.get_rank() * per_rank, per_rank)
    engine.backward(F.cross_entropy(engine(x).float().flatten(0, 1), y.flatten()))
    engine.step()


def live_state(engine) -> dict:
    """Copies of what the snapshot holds on this rank: fp32 partitions, optimizer states, module."""
    opt = engine.optimizer
    out = {"fp32": [], "optim": []}
    for g, group in enumerate(opt.optimizer.param_groups):
        pad = opt.groups_padding[g]
        flat = opt.single_partition_of_fp32_groups[g]
        out["fp32"].append(flat.detach()[: flat.numel() - pad].clone())
        st = opt.optimizer.state[group["params"][0]]
        out["optim"].append({k: (v.detach()[: v.numel() - pad].clone() if v.dim() else v.detach().clone())
                             for k, v in st.items()})
    out["module"] = {k: v.clone() for k, v in engine.module.state_dict().items()}
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def assert_equal_state(saved: dict, expected: dict, *, module: bool, what: str) -> None:
    for g, (a, b) in enumerate(zip(saved["fp32"], expected["fp32"], strict=True)):
        assert same_bits(a, b), f"{what}: fp32 partition of group {g} differs"
    for g, (a, b) in enumerate(zip(saved["optim"], expected["optim"], strict=True)):
        assert sorted(a) == sorted(b), (what, sorted(a), sorted(b))
        for k in b:
            assert same_bits(a[k], b[k]), f"{what}: optimizer state {k!r} of group {g} differs"
    if module:
        assert list(saved["module"]) == list(expected["module"]), what
        for k, v in expected["module"].items():
            assert same_bits(saved["module"][k], v), f"{what}: module tensor {k!r} differs"


def hold_writes() -> threading.Event:
    """Holds every save's write (on the save worker thread) until the returned event is set."""
    gate, original = threading.Event(), ucp.native._save.write_rank_files

    def held(*args, **kwargs):
        gate.wait(30)
        return original(*args, **kwargs)

    ucp.native._save.write_rank_files = held
    return gate


def mode_async(url: str, rank: int) -> dict:
    engine = build_engine()
    ckpt = ucp.deepspeed.Checkpointer(url, every=2, overlap="skip")
    gate = hold_writes()
    for step in (1, 2):
        train_step(engine, step)
    expected = live_state(engine)
    t0 = time.perf_counter()
    assert ckpt.maybe_save(2, engine, client_state={"samples": 2 * GLOBAL_BATCH})
    blocked = time.perf_counter() - t0
    handle = ckpt.pending
    assert handle is not None and not handle.done(), "maybe_save returned after the write, not after staging"
    for step in (3, 4):  # in-place updates while the save is in flight
        train_step(engine, step)
    assert not same_bits(engine.optimizer.single_partition_of_fp32_groups[0][:4], expected["fp32"][0][:4])
    assert not ckpt.maybe_save(4, engine), "a save due while the last one is in flight must be skipped"
    gate.set()
    t1 = time.perf_counter()
    ckpt.close()
    written = time.perf_counter() - t1
    assert ckpt.steps() == [2], ckpt.steps()
    saved = ucp.load(url, step=2, rank=rank)
    assert_equal_state(saved, expected, module=rank == 0, what=f"rank {rank}")
    assert saved["module"] is None or rank == 0
    assert saved["client"] == {"samples": 8} and saved["step"] == 2
    assert saved["meta"]["global_steps"] == 2 and saved["lr_scheduler"]["last_epoch"] == 2
    return {"blocked_s": blocked, "write_after_release_s": written}


def mode_crash(url: str, rank: int) -> dict:
    engine = build_engine()
    ckpt = ucp.deepspeed.Checkpointer(url, every=2)
    for step in range(1, 5):
        train_step(engine, step)
        ckpt.maybe_save(step, engine)
        if step == 2:
            ckpt.wait()  # step 2 committed
            os.environ.update(UCP_FAILPOINT="save.index:kill", UCP_FAILPOINT_RANK="1")
    print(f"rank {rank} reached the end of the crash run", flush=True)
    ckpt.close()  # rank 1 is killed writing step 4; rank 0 waits here until torchrun stops it
    return {}


def mode_resume(url: str, rank: int) -> dict:
    engine = build_engine()
    ckpt = ucp.deepspeed.Checkpointer(url, every=2)
    saved = ucp.load(url, step=2, rank=rank)
    start = ckpt.resume(engine)
    assert start == 2, start
    assert engine.global_steps == 2 and engine.lr_scheduler.last_epoch == 2
    assert ckpt.client_state == {}
    assert_equal_state(live_state(engine), saved, module=rank == 0, what=f"resumed rank {rank}")
    for step in (3, 4):
        train_step(engine, step)
        ckpt.maybe_save(step, engine)
    ckpt.close()
    assert ckpt.steps() == [2, 4], ckpt.steps()
    return {}


WIDE = {"dim": 256}  # ~1.6M parameters: each rank's partitions span many checksum blocks


def mode_wide_save(url: str, rank: int) -> dict:
    engine = build_engine(**WIDE)
    ckpt = ucp.deepspeed.Checkpointer(url, every=2)
    for step in (1, 2):
        train_step(engine, step)
        ckpt.maybe_save(step, engine)
    ckpt.close()
    return {}


def mode_reads(url: str, rank: int) -> dict:
    """Resume the 2-rank save on this job's ranks; every parameter's fp32 master and optimizer
    states, gathered back by DeepSpeed's own API, equal the saved ones bit for bit."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ucp.engines.deepspeed._snapshot import DeepSpeedSnapshot
    from ucp.resharder import group_partition

    engine = build_engine(**WIDE)
    ckpt = ucp.deepspeed.Checkpointer(url, every=2)
    assert ckpt.resume(engine) == 2 and engine.global_steps == 2
    read = ckpt.last_read.bytes
    opt = engine.optimizer
    opt._lazy_init_hp_params_optimizer_state()  # links the loaded states as DeepSpeed's step would
    snap = DeepSpeedSnapshot(url, 2)
    for name, p in engine.module.named_parameters():
        assert same_bits(safe_get_full_fp32_param(p), snap.read(name, "fp32")), name
        for s in ("exp_avg", "exp_avg_sq"):
            assert same_bits(safe_get_full_optimizer_state(p, s), snap.read(name, s)), (name, s)
    for k, v in engine.module.state_dict().items():
        assert same_bits(v, snap.read(k, "param")), k
    held = sum(v.numel() * v.element_size() for v in engine.module.state_dict().values())
    dp, me = dist.get_world_size(), dist.get_rank()
    for g, shapes in enumerate(engine._get_zero_param_shapes()):
        part = group_partition([s.numel() for s in shapes.values()], dp, me, 2, opt.round_robin_bit16_padding[g])
        held += sum(hi - lo for _, lo, hi in part.overlaps()) * 4 * 3  # fp32 + two AdamW moments
    train_step(engine, 3)
    return {"read": read, "held": held}


def main() -> None:
    mode, url = sys.argv[1], sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    modes = {"async": mode_async, "crash": mode_crash, "resume": mode_resume, "wide_save": mode_wide_save,
             "reads": mode_reads}
    result = modes[mode](url, rank)
    dist.barrier()
    sys.stdout.flush()
    os.write(1, f"\nOK {mode} {rank} {json.dumps(result)}\n".encode())  # one write: ranks share stdout
    sys.stderr.flush()
    os._exit(0)  # see examples/train_deepspeed.py: skip gloo/DeepSpeed teardown at exit


if __name__ == "__main__":
    main()
