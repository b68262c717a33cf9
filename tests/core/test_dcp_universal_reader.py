"""torch's own dcp.load reads a universal checkpoint through ucp.dcp.UniversalReader."""

from __future__ import annotations

import pytest
import torch

from safetensors.torch import load_file, save_file

import ucp

WIDTH = 512


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, WIDTH)
        self.down = torch.nn.Linear(WIDTH, WIDTH // 2)
        self.register_buffer("scale", torch.arange(4.0))

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * self.scale.sum()


def _train(seed: int):
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(2):
        model(torch.randn(4, WIDTH)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _flat(model, opt, **options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    flat = {f"model/{k}": v.detach().clone() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        flat.update({f"optim/{fqn}/{s}": torch.as_tensor(v).detach().clone() for s, v in st.items()})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    return flat, groups


@pytest.fixture(scope="module")
def universal(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp-reader")
    model, opt = _train(seed=0)
    ckpt = ucp.Checkpointer(str(root / "native"), every=1)
    ckpt.maybe_save(1, {"model": model, "optim": opt})
    ckpt.close()
    ucp.convert(str(root / "native"), str(root / "u"), progress=False)
    flat, groups = _flat(model, opt)
    save_file({k: v.contiguous() for k, v in flat.items()}, str(root / "want.safetensors"))
    return root, groups


def load_job(rank, world, url, want_file):
    """FSDP2 on ``world`` ranks, loaded with dcp.load from the universal checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ucp.dcp
    from ucp.storage import read_counter

    torch.manual_seed(1)  # other values than the saved ones
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.up, model.down, model):
        fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=5.0)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    before = read_counter()
    dcp.load(state, storage_reader=ucp.dcp.UniversalReader(url))
    read = (read_counter() - before).bytes
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got, groups = _flat(model, opt, full_state_dict=True)
    want = load_file(want_file)
    assert sorted(got) == sorted(want)
    wrong = [k for k, t in want.items() if got[k].dtype != t.dtype or not torch.equal(got[k], t)]
    held = sum(p.to_local().numel() * 4 for p in model.parameters())
    return wrong, groups, read, held


def test_dcp_load_into_fsdp2_at_another_world_size(universal, run_ranks):
    root, want_groups = universal
    results = run_ranks(load_job, 2, args=(str(root / "u"), str(root / "want.safetensors")))
    for r in results:
        wrong, groups, read, held = r.value
        assert wrong == []  # every weight, moment and step bit for bit
        assert groups == want_groups  # lr 1e-3, betas (0.8, 0.95) as saved, a tuple again
        # each rank holds half of every matrix and reads only the chunks of its half (3 arrays per
        # parameter: weights and both moments) plus the metadata; whole reads would be twice that
        assert read <= 1.10 * 3 * held + 64 * 1024, (read, held)


def test_a_group_mismatch_is_named(universal, run_ranks):
    root, _ = universal
    results = run_ranks(mismatch_job, 1, args=(str(root / "u"),), check=False)
    assert results[0].error is not None and "param group 0" in results[0].error


def mismatch_job(rank, world, url):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import ucp.dcp

    model = Net()
    opt = torch.optim.AdamW(list(model.up.parameters()), lr=1e-3)  # down.* left out
    msd, osd = get_state_dict(model, opt)
    from torch.distributed.checkpoint import DefaultLoadPlanner

    dcp.load({"model": msd, "optim": osd}, storage_reader=ucp.dcp.UniversalReader(url),
             planner=DefaultLoadPlanner(allow_partial_load=True))
