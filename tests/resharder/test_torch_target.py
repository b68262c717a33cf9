"""The torch target: FSDP2 saved on 2 ranks loads into FSDP2 on 4 and on 1; DTensor TP 2 loads
into a plain model on each of 2 data-parallel ranks. Loaded model and optimizer state equal the
source bit for bit (gathered), and a training step runs after loading."""

from __future__ import annotations

import pytest
import torch

import ucp

LR, WD = 3e-3, 0.1


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 16)
        self.up = torch.nn.Linear(16, 24)
        self.down = torch.nn.Linear(24, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 32, bias=False)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(self.norm(h))


def _loss(model, seed):
    idx = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


def _train(model, opt, rank, steps=3):
    for _ in range(steps):
        _loss(model, rank).backward()
        opt.step()
        opt.zero_grad()


def _full(model, opt):
    """Gathered model and optimizer state, flat: {"model/fqn": t, "optim/fqn/state": t}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    flat = {f"model/{k}": v.detach().clone().contiguous() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        flat.update({f"optim/{fqn}/{s}": v.detach().clone().contiguous() for s, v in st.items()})
    return flat, osd["param_groups"]


def save_sources(rank, world, root):
    """FSDP2 on 2 ranks, and DTensor TP on 2 ranks: train, save with ucp, keep the full state."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    fsdp = Net()
    for m in (fsdp.up, fsdp.down, fsdp):
        fully_shard(m, mesh=mesh)
    torch.manual_seed(0)
    tp = parallelize_module(Net(), mesh, {"up": ColwiseParallel(), "down": RowwiseParallel(),
                                          "head": ColwiseParallel(output_layouts=Replicate())})
    for name, model, seed in (("fsdp", fsdp, rank), ("tp", tp, 0)):
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        _train(model, opt, seed)
        msd, osd = get_state_dict(model, opt)
        ucp.save({"model": msd, "optim": osd}, f"{root}/{name}", step=3).wait()
        flat, _ = _full(model, opt)
        if rank == 0:
            save_file(flat, f"{root}/{name}.safetensors")
    return True


def load_fsdp(rank, world, src, ref_path):
    from safetensors.torch import load_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ucp.resharder import load_into

    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.up, model.down, model):
        fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.0)
    stats = load_into(model, opt, src)
    return _check_and_step(model, opt, load_file(ref_path), rank), stats.bytes_needed


def load_plain_dp(rank, world, src, ref_path):
    """TP 2 -> TP 1 with DP 2: a plain replica per rank; a DDP-style step afterwards."""
    from safetensors.torch import load_file

    from ucp.resharder import load_into

    torch.manual_seed(123)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    load_into(model, opt, src)
    return _check_and_step(model, opt, load_file(ref_path), rank, all_reduce=True), 0


def _check_and_step(model, opt, ref, rank, all_reduce=False):
    flat, groups = _full(model, opt)
    assert sorted(flat) == sorted(ref), sorted(set(flat) ^ set(ref))
    for k, want in ref.items():
        got = flat[k]
        assert got.dtype == want.dtype and got.shape == want.shape, k
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), k
    assert [(g["lr"], tuple(g["betas"]), g["weight_decay"]) for g in groups] == [(LR, (0.9, 0.999), WD)]
    before = {k: v.clone() for k, v in flat.items() if k.startswith("model/")}
    loss = _loss(model, rank)
    loss.backward()
    if all_reduce:
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= torch.distributed.get_world_size()
    opt.step()
    after, _ = _full(model, opt)
    assert torch.isfinite(loss) and any(not torch.equal(before[k], after[k]) for k in before)
    return True


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from ucp.testing import run_ranks

    root = tmp_path_factory.mktemp("torch")
    run_ranks(save_sources, 2, args=(str(root),))
    for name in ("fsdp", "tp"):
        ucp.convert(str(root / name), str(root / f"u-{name}"))
    return root


def test_fsdp2_two_ranks_into_four(sources, run_ranks):
    results = run_ranks(load_fsdp, 4, args=(str(sources / "u-fsdp"), str(sources / "fsdp.safetensors")))
    assert all(r.value[0] for r in results)
    one = ucp.open(str(sources / "u-fsdp"))
    total = sum(one.read(n, s).numel() * 4 for n in one.names() for s in ("fp32", "exp_avg", "exp_avg_sq"))
    assert all(r.value[1] < total / 2 for r in results)  # each rank reads its own shards only


def test_fsdp2_two_ranks_into_one_straight_from_the_native_save(sources, run_ranks):
    results = run_ranks(load_fsdp, 1, args=(str(sources / "fsdp"), str(sources / "fsdp.safetensors")))
    assert results[0].value[0]


def test_dtensor_tp2_into_tp1_dp2(sources, run_ranks):
    results = run_ranks(load_plain_dp, 2, args=(str(sources / "u-tp"), str(sources / "tp.safetensors")))
    assert all(r.value[0] for r in results)


def test_a_different_model_is_refused(sources):
    from ucp.resharder import load_into

    model = torch.nn.Linear(3, 3)
    with pytest.raises(ucp.StateError, match="weight"):
        load_into(model, None, str(sources / "u-tp"))


def test_a_live_dtype_other_than_the_stored_one_is_refused(sources):
    from ucp.resharder import load_into

    with pytest.raises(ucp.StateError, match="bfloat16.*float32"):
        load_into(Net().bfloat16(), None, str(sources / "u-tp"))
