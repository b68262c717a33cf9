"""ucp convert on ucp's own saves: DTensor TP x DP state converts with no spec, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import ucp
from ucp.cli import main


class Tiny(torch.nn.Module):
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


def train_tp_dp_and_save(rank, world, url, ref_path):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = parallelize_module(Tiny(), mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel(),
                                                    "head": ColwiseParallel(output_layouts=Replicate())})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    idx = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(mesh["dp"].get_local_rank()))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        loss.backward()
        # data-parallel gradient average, as DDP would do
        for p in model.parameters():
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            torch.distributed.all_reduce(g, group=mesh["dp"].get_group())
            g /= 2
        opt.step()
        opt.zero_grad()
    msd, osd = get_state_dict(model, opt)
    ucp.save({"model": msd, "optim": osd}, url, step=3, topology="dp=2,tp=2").wait()
    full_m, full_o = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    if rank == 0:
        flat = {f"model/{k}": v.contiguous() for k, v in full_m.items()}
        for fqn, st in full_o["state"].items():
            for s, v in st.items():
                flat[f"optim/{fqn}/{s}"] = v.contiguous()
        save_file(flat, ref_path)
    return True


@pytest.fixture(scope="module")
def tp_dp_checkpoint(tmp_path_factory):
    from ucp.testing import run_ranks

    root = tmp_path_factory.mktemp("native")
    run_ranks(train_tp_dp_and_save, 4, args=(str(root / "ckpt"), str(root / "ref.safetensors")))
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_dtensor_tp_dp_converts_without_spec(tp_dp_checkpoint, workers):
    dst = tp_dp_checkpoint / f"universal-{workers}"
    ckpt = ucp.convert(str(tp_dp_checkpoint / "ckpt"), str(dst), workers=workers)
    ref = load_file(tp_dp_checkpoint / "ref.safetensors")
    names = [k.removeprefix("model/") for k in ref if k.startswith("model/")]
    assert sorted(ckpt.names()) == sorted(names)
    assert ckpt.names()[0] == "emb.weight"  # model order is kept
    assert ckpt.step == 3 and ckpt.engine == "ucp" and str(ckpt.topology) == "dp=2,tp=2,pp=1,zero=0"
    for name in names:
        assert torch.equal(ckpt.read(name, "fp32"), ref[f"model/{name}"]), name
        assert torch.equal(ckpt.read(name, "param"), ref[f"model/{name}"]), name
        for s in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ckpt.read(name, s), ref[f"optim/{name}/{s}"]), (name, s)
    assert ckpt.param_groups[0]["lr"] == 3e-3 and ckpt.param_groups[0]["weight_decay"] == 0.1
    assert ckpt.info("up.weight").group == 0 and not ckpt.info("up.weight").frozen
    # a region read returns exactly that slice
    assert torch.equal(ckpt.read("head.weight", "exp_avg", region=(slice(3, 9), slice(2, 5))),
                       ref["optim/head.weight/exp_avg"][3:9, 2:5])


def test_cli_convert_and_refuses_to_overwrite(tp_dp_checkpoint):
    dst = tp_dp_checkpoint / "cli-universal"
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(tp_dp_checkpoint / "ckpt"), str(dst), "-q"])
    assert res.exit_code == 0, res.output
    assert "found ucp: ucp native checkpoint: step 3, 4 rank(s), topology dp=2,tp=2" in res.stderr
    assert "wrote" in res.stdout and "step 3" in res.stdout
    again = runner.invoke(main, ["convert", str(tp_dp_checkpoint / "ckpt"), str(dst), "-q"])
    last = again.stderr.strip().splitlines()[-1]
    assert again.exit_code == 1 and last.startswith("Error: ") and "--overwrite" in last
    assert runner.invoke(main, ["convert", str(tp_dp_checkpoint / "ckpt"), str(dst), "-q",
                                "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("where", ["write", "read"])
def test_interrupted_conversion_never_looks_complete(tp_dp_checkpoint, monkeypatch, where):
    """A failure while writing an array, or while the read-ahead thread reads the source."""
    dst = tp_dp_checkpoint / "broken"
    from ucp.universal._checkpoint import UniversalWriter
    from ucp.native._source import NativeCheckpoint

    calls = {"n": 0}
    cls, attr = (UniversalWriter, "write_later") if where == "write" else (NativeCheckpoint, "read")
    real = getattr(cls, attr)

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ucp.ConvertError("disk gone")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, attr, failing)
    with pytest.raises(ucp.ConvertError, match="disk gone"):
        ucp.convert(str(tp_dp_checkpoint / "ckpt"), str(dst))
    assert calls["n"] == 3  # stopped at the failure: the reader does not run on
    # the output was built beside dst, and the partial build is removed
    assert not dst.exists() and not list(tp_dp_checkpoint.glob("broken.partial-*"))
    with pytest.raises(ucp.CheckpointNotFoundError, match="not a universal checkpoint"):
        ucp.open(str(dst))


def test_missing_rank_file_is_named(tp_dp_checkpoint, tmp_path):
    import shutil

    src = tmp_path / "ckpt"
    shutil.copytree(tp_dp_checkpoint / "ckpt", src)
    (src / "step-00000003" / "rank-00002.safetensors").unlink()
    with pytest.raises(ucp.UcpError, match="rank-00002.safetensors"):
        ucp.convert(str(src), str(tmp_path / "u"))
    assert not (tmp_path / "u" / "zarr.json").exists() or \
        json.loads((tmp_path / "u" / "zarr.json").read_text())["attributes"]["ucp"]["complete"] is False


def test_sharded_plain_tensors_need_a_spec(tmp_path):
    from ucp.testing import run_ranks

    run_ranks(_save_plain_shards, 2, args=(str(tmp_path / "c"),))
    with pytest.raises(ucp.ConvertError, match="--spec"):
        ucp.convert(str(tmp_path / "c"), str(tmp_path / "u"))


def _save_plain_shards(rank, world, url):
    ucp.save({"model": {"w": torch.ones(2 + rank, 3)}}, url, step=1).wait()


def _assert_same_universal(a, b):
    assert a.names() == b.names()
    for n in a.names():
        assert a.info(n) == b.info(n)
        for s in a.info(n).states:
            assert torch.equal(a.read(n, s), b.read(n, s)), (n, s)


def test_local_to_s3_and_s3_to_s3(tp_dp_checkpoint, s3_url):
    import s3fs

    url, opts = s3_url
    local = ucp.convert(str(tp_dp_checkpoint / "ckpt"), str(tp_dp_checkpoint / "u-ref"), overwrite=True)
    on_s3 = ucp.convert(str(tp_dp_checkpoint / "ckpt"), f"{url}/universal", dst_storage_options=opts)
    _assert_same_universal(local, on_s3)
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(tp_dp_checkpoint / "ckpt"), f"{url.removeprefix('s3://')}/native", recursive=True)
    again = ucp.convert(f"{url}/native", f"{url}/universal2", storage_options=opts,
                        dst_storage_options=opts, workers=2)
    _assert_same_universal(local, again)


def convert_on_ranks(rank, world, src, dst):
    ckpt = ucp.convert(src, dst)
    return len(ckpt.names())


def test_convert_split_over_torchrun_ranks(tp_dp_checkpoint, run_ranks):
    dst = tp_dp_checkpoint / "u-ranks"
    results = run_ranks(convert_on_ranks, 2, args=(str(tp_dp_checkpoint / "ckpt"), str(dst)))
    single = ucp.convert(str(tp_dp_checkpoint / "ckpt"), str(tp_dp_checkpoint / "u-single"))
    assert [r.value for r in results] == [len(single.names())] * 2
    _assert_same_universal(single, ucp.open(str(dst)))


TOY_PLUGIN = '''
import json, torch
from ucp.engines import ParamInfo

class Toy:
    engine = "toy"; step = 7; topology = None
    def __init__(self, path): self.data = json.load(open(path + "/toy.json"))
    def names(self): return list(self.data)
    def info(self, n): return ParamInfo(shape=(len(self.data[n]),), dtype=torch.float32, states=("fp32",))
    def read(self, n, state="fp32"): return torch.tensor(self.data[n], dtype=torch.float32)
    def buffers(self): return {}
    def param_groups(self): return [{"lr": 0.5}]

class ToyEngine:
    name = "toy"
    def detect(self, url, *, storage_options=None):
        import os
        return "toy checkpoint" if os.path.exists(url + "/toy.json") else None
    def open(self, url, *, spec=None, storage_options=None, tag=None): return Toy(url)

ENGINE = ToyEngine()
'''


def test_third_party_engine_plugin_is_found_by_entry_point(tmp_path):
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "ucp_toy").mkdir(parents=True)
    (site / "ucp_toy" / "__init__.py").write_text(TOY_PLUGIN)
    dist = site / "ucp_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ucp-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ucp.engines]\ntoy = ucp_toy:ENGINE\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "toy.json").write_text(json.dumps({"a": [1.0, 2.0], "b": [3.5]}))
    env = {**os.environ, "PYTHONPATH": str(site)}
    ucp_cli = [sys.executable, "-c", "from ucp.cli import main; main()"]
    proc = subprocess.run(ucp_cli + ["convert", "--engine", "toy", str(src), str(tmp_path / "u"), "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "found toy: toy checkpoint" in proc.stderr
    ckpt = ucp.open(str(tmp_path / "u"))
    assert ckpt.engine == "toy" and ckpt.step == 7 and ckpt.param_groups == [{"lr": 0.5}]
    assert torch.equal(ckpt.read("a"), torch.tensor([1.0, 2.0]))
    auto = subprocess.run(ucp_cli + ["convert", str(src), str(tmp_path / "u2"), "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert auto.returncode == 0 and "found toy" in auto.stderr, auto.stderr
    missing = subprocess.run(ucp_cli + ["convert", "--engine", "nope", str(src), str(tmp_path / "u3")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and "no engine plugin 'nope'" in missing.stderr and "toy" in missing.stderr
