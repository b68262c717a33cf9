"""``ucp reshard --engine dcp``: torch's own dcp.load and dcp_to_torch_save read what ucp writes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import ucp

WIDTH = 256


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, WIDTH)
        self.down = torch.nn.Linear(WIDTH, 8)
        self.register_buffer("scale", torch.arange(3.0))

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) * self.scale.sum()


def _flat(model, opt, **options):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(**options))
    flat = {f"model/{k}": v.detach().clone().contiguous() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        flat.update({f"optim/{fqn}/{s}": torch.as_tensor(v).detach().clone() for s, v in st.items()})
    return flat, [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]


@pytest.fixture(scope="module")
def dcp_ckpt(tmp_path_factory):
    """A model trained in one process, saved by ucp, converted, resharded as a DCP checkpoint."""
    root = tmp_path_factory.mktemp("dcp-target")
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.randn(4, WIDTH)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    ckpt = ucp.Checkpointer(str(root / "native"), every=1)
    ckpt.maybe_save(1, {"model": model, "optim": opt})
    ckpt.close()
    ucp.convert(str(root / "native"), str(root / "u"), progress=False)
    report = ucp.reshard(str(root / "u"), str(root / "dcp"), topology="dp=2", engine="dcp", progress=False)
    flat, groups = _flat(model, opt)
    save_file(flat, str(root / "want.safetensors"))
    return root, groups, report


def load_job(rank, world, url, want_file):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for m in (model.up, model.down, model):
        fully_shard(m, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=5.0)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=url)  # torch's own reader: no ucp code in the load
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    got, groups = _flat(model, opt, full_state_dict=True)
    want = load_file(want_file)
    assert sorted(got) == sorted(want)
    return [k for k, t in want.items() if got[k].dtype != t.dtype or not torch.equal(got[k], t)], groups


def test_dcp_load_reads_the_written_checkpoint_into_fsdp2(dcp_ckpt, run_ranks):
    root, want_groups, report = dcp_ckpt
    assert report.engine == "dcp" and (root / "dcp" / ".metadata").is_file()
    for r in run_ranks(load_job, 2, args=(str(root / "dcp"), str(root / "want.safetensors"))):
        wrong, groups = r.value
        assert wrong == []  # every weight, buffer, moment and step bit for bit
        assert groups == want_groups  # hyper-parameters as saved (betas a tuple again)


def test_dcp_to_torch_save_reads_it(dcp_ckpt, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    root, _, _ = dcp_ckpt
    dcp_to_torch_save(str(root / "dcp"), str(tmp_path / "full.pt"))
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    want = load_file(str(root / "want.safetensors"))
    assert torch.equal(full["model"]["up.weight"], want["model/up.weight"])
    assert torch.equal(full["optim"]["state"]["down.bias"]["exp_avg_sq"], want["optim/down.bias/exp_avg_sq"])
    assert full["optim"]["param_groups"][0]["params"] == ["up.weight", "up.bias", "down.weight", "down.bias"]


def test_a_tp_the_model_cannot_take_is_refused_before_writing(dcp_ckpt, tmp_path):
    root, _, _ = dcp_ckpt
    spec = 'param "up.weight" split tp dim 0\nparam "up.bias" split tp dim 0\ndefault replicate tp\n'
    with pytest.raises(ucp.TopologyError, match="up.weight.*256.*3|up.bias.*256.*3"):
        ucp.reshard(str(root / "u"), str(tmp_path / "out"), topology="tp=3", engine="dcp", spec=spec,
                    progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_existing_dcp_checkpoint_is_kept_without_overwrite(dcp_ckpt):
    root, _, _ = dcp_ckpt
    with pytest.raises(ucp.CheckpointExistsError, match="overwrite"):
        ucp.reshard(str(root / "u"), str(root / "dcp"), topology="dp=1", engine="dcp", progress=False)
