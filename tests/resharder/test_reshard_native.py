"""``ucp.reshard`` / ``ucp reshard`` to ucp's own layout: files ``ucp.load`` reads back per rank,
from a universal checkpoint or straight from a distributed save; round trip through convert."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.grammar import bundled_spec
from ucp.resharder import load_rank_state


def _helper(name: str):
    spec = importlib.util.spec_from_file_location(f"ucp_tests_resharder_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _helper("_ref")
SPEC = bundled_spec("llama_megatron", constants=ref.C)


def _loaded(url, topo):
    return [{k: v for k, v in ucp.load(url, rank=r).items() if k != "layout"}
            for r in range(topo.world_size)]


@pytest.mark.parametrize("target,alignment", [("dp=2,tp=2,zero=1", 2), ("dp=2,pp=2,zero=3", 1)])
def test_files_load_back_as_the_reference(llama, tmp_path, target, alignment):
    topo = ucp.Topology.parse(target)
    report = ucp.reshard(llama[1], str(tmp_path / "out"), topology=topo, alignment=alignment)
    assert report.step == 7 and report.ranks == tuple(range(4)) and report.engine == "ucp"
    assert report.stats.bytes_read >= report.stats.bytes_needed > 0  # tiny arrays: one chunk each
    for rank, state in enumerate(_loaded(str(tmp_path / "out"), topo)):
        ref.assert_same(state, ref.reference_rank(topo, rank, alignment), f"rank {rank}")
    manifest = json.loads((tmp_path / "out" / "step-00000007" / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and manifest["topology"]["zero"] == topo.zero
    assert "linear_qkv" in manifest["spec"]


def test_from_the_distributed_save_and_back_through_convert(llama, tmp_path):
    """tp2 x pp2 native -> (on the fly) tp4 native -> convert: the same universal checkpoint."""
    out = str(tmp_path / "tp4")
    ucp.reshard(llama[0], out, topology="tp=4", spec=SPEC)
    assert not (tmp_path / "tp4" / "zarr.json").exists()  # no universal copy on the way
    again = ucp.convert(out, str(tmp_path / "u2"))  # the manifest's spec, sizes written in
    first = ucp.open(llama[1])
    assert again.names() == first.names() and again.param_groups == first.param_groups
    for n in first.names():
        assert again.info(n) == first.info(n), n
        for s in first.info(n).states:
            assert torch.equal(again.read(n, s), first.read(n, s)), (n, s)


def test_existing_step_needs_overwrite(llama, tmp_path):
    out = str(tmp_path / "o")
    ucp.reshard(llama[1], out, topology="dp=2")
    with pytest.raises(ucp.CheckpointExistsError, match="overwrite"):
        ucp.reshard(llama[1], out, topology="dp=2")
    ucp.reshard(llama[1], out, topology="dp=2,zero=1", overwrite=True)
    assert "flat" in ucp.load(out, rank=1)["optim"]


def test_bad_target_writes_nothing(llama, tmp_path):
    with pytest.raises(ucp.TopologyError, match="linear_qkv.weight"):
        ucp.reshard(llama[1], str(tmp_path / "bad"), topology="tp=3")
    assert not (tmp_path / "bad").exists()


def test_unknown_target_engine_is_named(llama, tmp_path):
    with pytest.raises(ucp.UcpError, match="no reshard target 'nope'"):
        ucp.reshard(llama[1], str(tmp_path / "x"), topology="dp=2", engine="nope")


def test_cli(llama, tmp_path):
    runner = CliRunner()
    text = SPEC.text
    for k, v in ref.C.items():  # the bundled spec, sized for the test model, as a file
        text = re.sub(rf"^{k} = .*$", f"{k} = {v}", text, flags=re.M)
    (tmp_path / "llama.ucl").write_text(text)

    res = runner.invoke(main, ["reshard", llama[1], str(tmp_path / "c"), "--to", "dp=2,zero=2",
                               "--alignment", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert "step 7, 2 ranks (dp=2,tp=1,pp=1,zero=2)" in res.stdout and "amplification" in res.stdout
    state = ucp.load(str(tmp_path / "c"), rank=1)
    ref.assert_same({k: v for k, v in state.items() if k != "layout"},
                    ref.reference_rank(ucp.Topology.parse("dp=2,zero=2"), 1, 2))
    js = runner.invoke(main, ["reshard", llama[0], str(tmp_path / "j"), "--to", "tp=4",
                              "--spec", str(tmp_path / "llama.ucl"), "--json", "-q"])
    assert js.exit_code == 0, js.output
    assert json.loads(js.stdout)["ranks"] == 4 and json.loads(js.stdout)["reads"]["bytes_read"] > 0
    bad = runner.invoke(main, ["reshard", llama[1], str(tmp_path / "b"), "--to", "tp=3", "-q"])
    assert bad.exit_code == 1 and bad.stderr.startswith("Error: target topology")
    assert "cannot hold parameter" in bad.stderr and "linear_qkv" in bad.stderr
    usage = runner.invoke(main, ["reshard", llama[1], str(tmp_path / "u"), "--to", "tp=two"])
    assert usage.exit_code == 2


class Tiny(torch.nn.Module):
    """A DP-only model: no spec needed; a 0-d parameter and a frozen one included."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(6, 7)
        self.scale = torch.nn.Parameter(torch.tensor(1.5))
        self.frozen = torch.nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, idx):
        return self.lin(self.emb(idx)).mul(self.scale).sum() + self.frozen.sum()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    for _ in range(2):
        model(torch.randint(0, 11, (5,))).backward()
        opt.step()
    msd, osd = get_state_dict(model, opt)
    ucp.save({"model": msd, "optim": osd}, str(root / "n"), step=2).wait()
    ucp.convert(str(root / "n"), str(root / "u"))
    return root, {k: v.detach().clone() for k, v in msd.items()}, osd


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_dp_only_model_any_dp_and_zero(tiny, dp, zero):
    root, msd, osd = tiny
    topo = ucp.Topology(dp=dp, zero=zero)
    trainable = [k for k in msd if k != "frozen"]
    for rank in range(dp):
        got = load_rank_state(str(root / "u"), topo, rank, alignment=2)
        model = {k: ref.zero3(v, dp, rank, 2) if zero == 3 else v for k, v in msd.items()}
        state = {k: {"step": osd["state"][k]["step"]} for k in trainable}
        if zero in (0, 3):
            for k in trainable:
                for s in ("exp_avg", "exp_avg_sq"):
                    v = osd["state"][k][s]
                    state[k][s] = v if zero == 0 else ref.zero3(v, dp, rank, 2)
        groups = [{**{k: list(v) if isinstance(v, tuple) else v for k, v in osd["param_groups"][0].items()
                      if k != "params"}, "params": trainable}]
        optim = {"state": state, "param_groups": groups}
        if zero in (1, 2):
            optim["flat"] = [{s: ref.zero_flat([osd["state"][k][s] for k in trainable], dp, rank, 2)
                              for s in ("exp_avg", "exp_avg_sq")}]
        ref.assert_same({k: v for k, v in got.items() if k != "layout"},
                        {"model": model, "optim": optim, "step": 2}, f"dp={dp} zero={zero} rank {rank}")


def test_on_object_storage(tiny, s3_url):
    """Universal checkpoint on S3 -> resharded files on S3, read back per rank."""
    import s3fs

    root, msd, _ = tiny
    url, opts = s3_url
    s3fs.S3FileSystem(**opts).put(str(root / "u"), f"{url.removeprefix('s3://')}/u", recursive=True)
    report = ucp.reshard(f"{url}/u", f"{url}/out", topology="dp=2,zero=3", storage_options=opts,
                         dst_storage_options=opts)
    assert report.stats.bytes_read > 0
    for rank in range(2):
        got = ucp.load(f"{url}/out", rank=rank, storage_options=opts)
        assert torch.equal(got["model"]["lin.weight"], ref.zero3(msd["lin.weight"], 2, rank, 1))


def reshard_on_ranks(rank, world, src, dst):
    return list(ucp.reshard(src, dst, topology="dp=2,tp=2,zero=1").ranks)


def test_split_over_torchrun_processes(llama, tmp_path, run_ranks):
    results = run_ranks(reshard_on_ranks, 2, args=(llama[1], str(tmp_path / "d")))
    assert [r.value for r in results] == [[0, 2], [1, 3]]
    ucp.reshard(llama[1], str(tmp_path / "s"), topology="dp=2,tp=2,zero=1")
    topo = ucp.Topology.parse("dp=2,tp=2,zero=1")
    for a, b in zip(_loaded(str(tmp_path / "d"), topo), _loaded(str(tmp_path / "s"), topo)):
        ref.assert_same(a, b)
