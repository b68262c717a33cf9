"""``ucp.reshard(..., engine="deepspeed-universal")``: DeepSpeed's universal layout, loaded by a real engine.

The slow tests take a real ZeRO-2 bf16 checkpoint saved on 2 ranks, convert it to ucp's universal
format, reshard it for 1 and 3 ranks, and launch a real DeepSpeed engine on each (this file, run as
a script under torchrun). The engine's gathered fp32 masters and optimizer states before its first
step must equal the universal checkpoint's bit for bit, and the frozen parameter and buffers (which
the script scrambles before loading) must come back too. The fast tests check the files themselves.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ucp.testing import scaled_timeout

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "engines" / "_ds_train.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _train_module():
    return _load("ucp_tests_ds_train_target", TRAIN)


if __name__ != "__main__":  # the real-checkpoint fixtures live with the engine readers' tests
    _engines = _load("ucp_tests_engines_conftest_target", HERE.parent / "engines" / "conftest.py")
    ds_checkpoint = _engines.ds_checkpoint


def _tiny_universal(tmp_path):
    import ucp

    fake = _engines.write_fake_zero(tmp_path / "ds", stage=2, dp=2,
                                    groups=[[("a.weight", (3, 5)), ("b", (7,))]], frozen=[("f", (2, 3))])
    uni = tmp_path / "uni"
    ucp.convert(str(fake.root), str(uni), progress=False)
    return fake, uni


# --- fast: the files, without DeepSpeed ------------------------------------------------------------

def test_files_hold_whole_fp32_states(tmp_path):
    import ucp

    fake, uni = _tiny_universal(tmp_path)
    report = ucp.reshard(str(uni), str(tmp_path / "out"), topology="dp=3,zero=2", engine="deepspeed-universal",
                         progress=False)
    out = tmp_path / "out"
    tag = (out / "latest_universal").read_text()
    assert tag == f"global_step{report.step}"
    for name in ("a.weight", "b"):
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            got = torch.load(out / tag / "zero" / name / f"{state}.pt", weights_only=True)["param"]
            assert got.dtype == torch.float32 and torch.equal(got, fake.expected[name][state])
        assert torch.load(out / tag / "zero" / name / "step.pt", weights_only=True).item() == report.step
    assert not (out / tag / "zero" / "f").exists()  # frozen: not the optimizer's
    opt = torch.load(out / tag / "zero" / "optimizer_state.pt", weights_only=True)
    assert [g["params"] for g in opt["param_groups"]] == [[0]] and opt["ds_version"]
    model = torch.load(out / tag / "mp_rank_00_model_states.pt", weights_only=True)
    assert torch.equal(model["module"]["f"], fake.expected["f"]["param"])
    assert torch.equal(model["module"]["mask"], fake.buffers["mask"])
    assert model["dp_world_size"] == 3 and model["global_steps"] == report.step
    assert list(model["frozen_param_shapes"]) == ["f"] and model["buffer_names"] == ["mask", "scale"]


def test_straight_from_a_deepspeed_checkpoint(tmp_path):
    """A DeepSpeed checkpoint resharded on the fly (no universal copy) gives the same files."""
    import ucp

    fake, uni = _tiny_universal(tmp_path)
    ucp.reshard(str(uni), str(tmp_path / "a"), topology="dp=1", engine="deepspeed-universal")
    ucp.reshard(str(fake.root), str(tmp_path / "b"), topology="dp=1", engine="deepspeed-universal")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.pt"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.pt"))
    for rel in files:
        if rel.name == "mp_rank_00_model_states.pt":
            continue  # records its source's url
        a, b = (torch.load(root / rel, weights_only=True) for root in (tmp_path / "a", tmp_path / "b"))
        if isinstance(a, dict) and "param" in a:
            assert torch.equal(a["param"], b["param"]), rel


@pytest.mark.parametrize("topology", ["dp=2,tp=2,zero=1", "dp=2,pp=2", "dp=2,zero=3"])
def test_refuses_topologies_deepspeed_cannot_repartition(tmp_path, topology):
    import ucp

    _, uni = _tiny_universal(tmp_path)
    with pytest.raises(ucp.TopologyError, match="deepspeed"):
        ucp.reshard(str(uni), str(tmp_path / "out"), topology=topology, engine="deepspeed-universal")
    assert not (tmp_path / "out").exists()  # refused before any I/O


def test_existing_tag_needs_overwrite(tmp_path):
    import ucp

    _, uni = _tiny_universal(tmp_path)
    ucp.reshard(str(uni), str(tmp_path / "out"), topology="dp=1", engine="deepspeed-universal")
    with pytest.raises(ucp.CheckpointExistsError):
        ucp.reshard(str(uni), str(tmp_path / "out"), topology="dp=1", engine="deepspeed-universal")
    ucp.reshard(str(uni), str(tmp_path / "out"), topology="dp=1", engine="deepspeed-universal", overwrite=True)


# --- slow: a real DeepSpeed engine loads it --------------------------------------------------------

def _launch(ranks: int, *args: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=scaled_timeout(300), env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 3])
def test_real_engine_loads_on_another_dp_size(ds_checkpoint, tmp_path_factory, tmp_path, ranks):
    import ucp

    src, args = ds_checkpoint("z2_bf16_dp2")
    uni = tmp_path_factory.getbasetemp() / "z2_bf16_dp2-universal"
    if not (uni / "zarr.json").exists():
        ucp.convert(str(src), str(uni), progress=False)
    out = tmp_path / "ds"
    ucp.reshard(str(uni), str(out), topology=f"dp={ranks},zero=2", engine="deepspeed-universal", progress=False)
    flags = ["--stage", "2", "--dtype", "bf16", "--groups", "2", "--tie"]
    _launch(ranks, str(out), str(tmp_path / "seen.pt"), *flags)
    seen = torch.load(tmp_path / "seen.pt", weights_only=True)
    u = ucp.open(str(uni))
    assert seen["step"] == u.step
    for name in u.names():
        info = u.info(name)
        if info.frozen:
            assert torch.equal(seen["frozen"][name], u.read(name, "param")), name
            continue
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(seen[state][name], u.read(name, state)), (name, state)
    for name in u.buffer_names():
        assert torch.equal(seen["buffers"][name], u.read_buffer(name).to(seen["buffers"][name].dtype)), name
    assert torch.isfinite(torch.tensor(seen["loss"]))
    assert seen["groups"] == [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in u.param_groups]


def _engine_main(argv: list[str]) -> None:
    """Launched rank: build the model, scramble what a universal load must restore, load, record."""
    import deepspeed
    import torch.nn.functional as F
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    import ucp

    load_dir, seen_path, *flags = argv
    train = _train_module()
    args = train.parse_args([load_dir, *flags])
    deepspeed.init_distributed(dist_backend="gloo")
    model = train.build_model(args)
    with torch.no_grad():  # make sure restored values come from the checkpoint, not the seed
        model.wpe.add_(1.0)
        model.pos_scale.mul_(-1.0)
        model.mask.logical_not_()
    opt = torch.optim.AdamW(train.param_groups(model, args.groups), lr=0.5, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.7)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=train.ds_config(args))
    step = ucp.deepspeed.load_universal(engine, load_dir)
    seen: dict = {"step": step, "fp32": {}, "exp_avg": {}, "exp_avg_sq": {}, "frozen": {}, "buffers": {}}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            seen["frozen"][name] = p.detach().clone()
            continue
        seen["fp32"][name] = safe_get_full_fp32_param(p).clone()
        for state in ("exp_avg", "exp_avg_sq"):
            seen[state][name] = safe_get_full_optimizer_state(p, state).clone()
    seen["buffers"] = {n: b.clone() for n, b in engine.module.named_buffers()}
    seen["groups"] = [{"lr": g["lr"], "weight_decay": g["weight_decay"]} for g in engine.optimizer.param_groups]
    gen = torch.Generator().manual_seed(7 + engine.global_rank)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    loss = F.cross_entropy(engine(idx[:, :-1]).float().reshape(-1, args.vocab), idx[:, 1:].reshape(-1))
    engine.backward(loss)
    engine.step()
    seen["loss"] = loss.item()
    if engine.global_rank == 0:
        torch.save(seen, seen_path)
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/engines/_ds_train.py: skip gloo/shm destructors that may abort


if __name__ == "__main__":
    _engine_main(sys.argv[1:])
