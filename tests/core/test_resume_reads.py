"""Elastic resume reads only what each rank holds: ``Checkpointer.resume`` onto another topology
goes through the resharder, straight from the saving ranks' files. Summed over the new ranks,
the bytes read from storage (every storage read counted, metadata included) are at most 1.10x
the bytes of the tensors the ranks hold afterwards; the loaded state equals the saved one bit for
bit; and reading it into the rank's live tensors takes only bounded buffers, not the model's size."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import ucp

# Two H x H layers. FSDP2 gets H = 2048 (16 MiB per tensor and state in fp32): reading whole
# tensors then needs more memory than the reader's bounded buffers, which the test tells apart.
WIDTH = {"fsdp": 2048}


class Net(torch.nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.up = torch.nn.Linear(h, h)
        self.down = torch.nn.Linear(h, h)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _build(layout: str, world: int, seed: int):
    """The model and optimizer laid out as ``layout`` ("dp", "zero1", "fsdp", "tp2") on ``world`` ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(seed)
    model = Net(WIDTH.get(layout, 1024))
    tp = 2 if layout == "tp2" else 1
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    if layout == "tp2":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in (model.up, model.down, model):
            fully_shard(m, mesh=mesh["dp"])
    if layout == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return model, ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _is_zero(opt) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(opt, ZeroRedundancyOptimizer)


def _full(model, opt):
    """Gathered model + optimizer state on every rank: {"model/fqn" | "optim/fqn/state": tensor}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if _is_zero(opt):
        opt.consolidate_state_dict(to=0)
        names = {i: n for i, (n, _) in enumerate(model.named_parameters())}
        osd = {"state": {names[i]: s for i, s in opt.state_dict()["state"].items()}} \
            if torch.distributed.get_rank() == 0 else {"state": {}}
        msd = model.state_dict()
    else:
        msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    flat = {f"model/{k}": v.detach().clone().contiguous() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        flat.update({f"optim/{fqn}/{s}": torch.as_tensor(v).detach().clone() for s, v in st.items()})
    return flat


def save_job(rank, world, layout, root):
    """Trains one step (same batch everywhere, so plain replicas agree) and saves it as step 1."""
    from safetensors.torch import save_file

    model, opt = _build(layout, world, seed=0)
    model(torch.ones(4, model.up.in_features)).square().mean().backward()
    opt.step()
    ckpt = ucp.Checkpointer(f"{root}/ckpt", every=1)
    ckpt.maybe_save(1, {"model": model, "optim": opt})
    ckpt.close()
    flat = _full(model, opt)
    if rank == 0:
        save_file(flat, f"{root}/ref.safetensors")
    return True


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _local_bytes(model, opt) -> int:
    """Bytes of the tensors this rank holds: its model shards and its optimizer states."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t
    held = opt.optim.state if _is_zero(opt) else opt.state
    tensors = [local(p) for p in model.parameters()]
    tensors += [local(v) for st in held.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def resume_job(rank, world, layout, root):
    """Resumes on the new layout; returns (bytes read, bytes held, the largest growth of resident
    memory while the resharder read the data into the live tensors)."""
    from safetensors.torch import load_file

    import ucp.resharder._torch as target
    from ucp.storage import read_counter

    model, opt = _build(layout, world, seed=1)
    samples, stop, window = [], threading.Event(), []

    def sample():
        while not stop.is_set():
            samples.append((time.monotonic(), _rss()))
            time.sleep(0.002)

    def timed_read_plan(*args, **kwargs):  # torch has built the optimizer states by now
        window.append((time.monotonic(), _rss()))
        try:
            return read_plan(*args, **kwargs)
        finally:
            window.append((time.monotonic(), _rss()))
    read_plan, target.read_plan = target.read_plan, timed_read_plan
    sampler = threading.Thread(target=sample, daemon=True)
    before = read_counter()
    sampler.start()
    step = ucp.Checkpointer(f"{root}/ckpt", every=1).resume({"model": model, "optim": opt})
    stop.set()
    sampler.join()
    read = (read_counter() - before).bytes
    assert step == 1 and len(window) == 2
    (t0, base), (t1, end) = window
    grew = max([end] + [r for t, r in samples if t0 <= t <= t1]) - base
    held = _local_bytes(model, opt)
    flat, ref = _full(model, opt), load_file(f"{root}/ref.safetensors")
    if rank == 0 or not _is_zero(opt):
        assert sorted(flat) == sorted(ref)
        for k, want in ref.items():
            assert torch.equal(flat[k].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), k
    return read, held, grew


SCENARIOS = {  # name: (layout and ranks saving, layout and ranks resuming)
    "dp4->dp2": (("dp", 4), ("dp", 2)),
    "dp2->dp4": (("dp", 2), ("dp", 4)),
    "zero1x4->zero1x2": (("zero1", 4), ("zero1", 2)),
    "tp2xdp2->tp1xdp3": (("tp2", 4), ("dp", 3)),
    "fsdp2x2->fsdp2x4": (("fsdp", 2), ("fsdp", 4)),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_resume_reads_at_most_ten_percent_more_than_the_ranks_hold(tmp_path, run_ranks, name):
    (a, na), (b, nb) = SCENARIOS[name]
    run_ranks(save_job, na, args=(a, str(tmp_path)))
    results = [r.value for r in run_ranks(resume_job, nb, args=(b, str(tmp_path)))]
    read, held = sum(r[0] for r in results), sum(r[1] for r in results)
    print(f"{name}: read {read} held {held} amplification {read / held:.3f} growth {[r[2] for r in results]}")
    assert held > 0 and read / held <= 1.10, (name, read, held, read / held)
    # reading the data into the live tensors (which torch has allocated, the rank's own share)
    # takes only the reader's bounded buffers, whatever the model's size: a piece per reading
    # thread (twice: a freed piece stays in its thread's malloc arena), the block cache, slack
    from ucp.native._meta import BLOCK_BYTES
    from ucp.native._source import CACHE_BLOCKS, PIECE_BYTES
    from ucp.resharder._read import PARTIAL_THREADS

    allowance = 2 * PARTIAL_THREADS * PIECE_BYTES + CACHE_BLOCKS * BLOCK_BYTES + 4 * 2**20
    for _, share, grew in results:
        assert grew <= allowance, (name, share, grew, allowance)
