"""``ucp.reshard(..., topology="ep=E,dp=N,zero=K", engine="deepspeed")`` of a DeepSpeed MoE model.

The slow tests train a real DeepSpeed MoE job (4 experts, ep=2 over dp=2, ZeRO-2, bf16, a WarmupLR
scheduler; ``tests/engines/_ds_train_mp.py``) and record what DeepSpeed itself gathers for every
parameter (``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``), the frozen parameter,
buffers, step and scheduler. ucp reshards the saved checkpoint for another ep and/or dp; a stock
DeepSpeed MoE job of that size loads it with plain ``engine.load_checkpoint`` (buffers scrambled
first) and must hold every state bit for bit equal, each local expert matched to its global id.
The fast tests check the files against DeepSpeed's layout rules and the refusals.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from ucp.testing import run_command, scaled_timeout

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "engines" / "_ds_train_mp.py"
EXPERT = re.compile(r"(.*\.deepspeed_experts\.)(\d+)(\..*)")
PREFIX = "moe.deepspeed_moe.experts.deepspeed_experts."

if __name__ != "__main__":  # the fake-checkpoint writer lives with the engine readers' tests
    import importlib.util

    _spec = importlib.util.spec_from_file_location("ucp_tests_engines_conftest_native_moe", HERE.parent / "engines"
                                                   / "conftest.py")
    _engines = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _engines
    _spec.loader.exec_module(_engines)
    _spec = importlib.util.spec_from_file_location("ucp_tests_resharder_native_for_moe", HERE / "test_deepspeed_native.py")
    _native_tests = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_native_tests)


def _fake_moe(tmp_path, experts=4):
    """A DeepSpeed ZeRO-2 layout (dp=2) whose second and third groups hold ``experts`` experts."""
    moe = [[(f"{PREFIX}{e}.0.weight", (6, 4)), (f"{PREFIX}{e}.2.weight", (4, 6))] for e in range(experts)]
    bias = [[(f"{PREFIX}{e}.0.bias", (6,))] for e in range(experts)]
    return _engines.write_fake_zero(tmp_path / "ds", stage=2, dp=2,
                                    groups=[[("a.weight", (3, 5)), ("b", (7,))],
                                            [p for e in moe for p in e], [p for e in bias for p in e]],
                                    frozen=[("f", (2, 3))])


# --- fast: the files, without DeepSpeed ------------------------------------------------------------

@pytest.mark.parametrize("ep, dp", [(2, 4), (2, 2), (4, 4), (1, 2)])
def test_files_follow_deepspeeds_moe_layout(tmp_path, ep, dp):
    """Rank r holds the local experts of expert-parallel rank r % ep, its expert groups cut over the
    dp / ep ranks of its expert-data-parallel group (r // ep); non-expert groups over all dp ranks;
    each expert's weights are in its own file under global names; the model file has no experts."""
    import ucp
    from ucp.resharder import group_partition

    fake = _fake_moe(tmp_path)
    out = tmp_path / "out"
    report = ucp.reshard(str(fake.root), str(out), topology=f"dp={dp},ep={ep},zero=2", engine="deepspeed",
                         progress=False)
    assert report.job_ranks == dp  # the experts' groups are cut out of the dp ranks (what `ucp reshard` prints)
    tag = out / (out / "latest").read_text()
    assert sorted(p.name for p in tag.iterdir()) == sorted(
        ["mp_rank_00_model_states.pt"] + [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
        + [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(dp)])
    model = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)
    assert model["num_experts"] == [4] and model["dp_world_size"] == dp
    assert not any(EXPERT.fullmatch(n) for n in model["module"])
    per = 4 // ep
    assert list(model["param_shapes"][1]) == [f"{PREFIX}{e}.{k}.weight" for e in range(per) for k in (0, 2)]
    for e in range(4):
        got = torch.load(tag / f"layer_0_expert_{e}_mp_rank_00_model_states.pt", weights_only=True)
        want = {n: s["param"] for n, s in fake.expected.items() if n.startswith(f"{PREFIX}{e}.")}
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    groups = [[n for n, _ in g.items()] for g in model["param_shapes"]]
    for r in range(dp):
        osd = torch.load(tag / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                         weights_only=True)["optimizer_state_dict"]
        assert osd["partition_count"] == [dp, dp // ep, dp // ep]
        names = [groups[0], *[[EXPERT.sub(lambda m: f"{m[1]}{(r % ep) * per + int(m[2])}{m[3]}", n) for n in g]
                              for g in groups[1:]]]
        for g, group in enumerate(names):
            count, at = (dp, r) if g == 0 else (dp // ep, r // ep)
            part = group_partition([math.prod(fake.expected[n]["fp32"].shape) for n in group], count, at, 2)
            for state in ("fp32", "exp_avg"):
                flat = torch.cat([fake.expected[n][state].reshape(-1) for n in group])
                want = torch.zeros(part.partition_numel)
                got_n = max(min(part.stop, flat.numel()) - part.start, 0)
                want[:got_n] = flat[part.start:part.start + got_n]
                got = (osd["single_partition_of_fp32_groups"][g] if state == "fp32"
                       else osd["base_optimizer_state"]["state"][g][state])
                assert torch.equal(got, want[:got.numel()]), (r, g, state)
        hyper = osd["base_optimizer_state"]["param_groups"]
        assert [h["params"] for h in hyper] == [[0], [1], [2]]
        assert [h["name"] for h in hyper[1:]] == [f"ep_size_{ep}"] * 2


def test_pipeline_options_are_refused_for_moe_and_autotp_targets(tmp_path):
    """--partition / --extra-layer place PipelineModule layers; an MoE or AutoTP target has no stages,
    so they are refused before writing, not ignored."""
    import ucp

    fake = _fake_moe(tmp_path)
    for topology, options in (("dp=2,ep=2,zero=2", {"partition": "uniform"}),
                              ("dp=2,tp=2,zero=1", {"extra_layers": ("3",)})):
        with pytest.raises(ucp.TopologyError, match="partition / extra layers .* no stages"):
            ucp.reshard(str(fake.root), str(tmp_path / "out"), topology=topology, engine="deepspeed",
                        progress=False, **options)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("topology, words", [
    ("dp=3,ep=3,zero=2", r"ep=3 does not divide the 4 experts of MoE layer .*deepspeed_experts.0.0.weight"),
    ("dp=3,ep=2,zero=2", "ep=2 does not divide dp=3"),
    ("dp=2,ep=2,zero=3", "ZeRO stage 1 or 2"),
    ("dp=2,ep=2,tp=2,zero=2", "'tp': 2"),
])
def test_refuses_a_bad_moe_target_before_writing(tmp_path, topology, words):
    import ucp

    fake = _fake_moe(tmp_path)
    with pytest.raises(ucp.TopologyError, match=words):
        ucp.reshard(str(fake.root), str(tmp_path / "out"), topology=topology, engine="deepspeed")
    assert not (tmp_path / "out").exists()


def moe_on_ranks(rank, world, src, dst, topology):
    import ucp

    return list(ucp.reshard(src, dst, topology=topology, engine="deepspeed", progress=False).ranks)


def _assert_same_files(one: Path, two: Path) -> None:
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    for name in files:
        a, b = (torch.load(d / name, weights_only=True) for d in (one, two))
        a.pop("ucp", None), b.pop("ucp", None)  # records its source's url
        _native_tests._assert_same(a, b, name)


def test_moe_split_over_torchrun_processes(tmp_path, run_ranks):
    """Two writing processes share the dp ranks' files out (process 0 also writes the expert and
    model files); the files equal one process's."""
    import ucp

    fake = _fake_moe(tmp_path)
    topology = "dp=4,ep=2,zero=2"
    results = run_ranks(moe_on_ranks, 2, args=(str(fake.root), str(tmp_path / "two"), topology))
    assert [r.value for r in results] == [[0, 2], [1, 3]]
    ucp.reshard(str(fake.root), str(tmp_path / "one"), topology=topology, engine="deepspeed", progress=False)
    _assert_same_files(tmp_path / "one" / "global_step3", tmp_path / "two" / "global_step3")
    assert (tmp_path / "two" / "latest").read_text() == "global_step3"


# --- slow: stock DeepSpeed MoE jobs save and load ---------------------------------------------------

def _job(ranks: int, *args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(_engines.free_port()), str(TRAIN), *args]
    run_command(cmd, what=f"DeepSpeed MoE job on {ranks} ranks", timeout=scaled_timeout(300))


def _by_global(gathered: Path, ep: int, data_first: bool = False) -> tuple[dict, list[dict]]:
    """Every trainable parameter's gathered states under its global name (local expert l of
    expert-parallel rank e is global expert e * n + l; rank r is in e = r % ep, or r // (dp / ep)
    in DeepSpeed's data-before-expert order), and the per-rank records."""
    recs = [torch.load(gathered / f"rank-{r}.pt", weights_only=True)
            for r in range(len(list(gathered.glob("rank-*.pt"))))]
    out: dict[str, dict] = {}
    for r, rec in enumerate(recs):
        e = r // (len(recs) // ep) if data_first else r % ep
        for local, states in rec["params"].items():
            m = EXPERT.fullmatch(local)
            name = f"{m[1]}{e * (4 // ep) + int(m[2])}{m[3]}" if m else local
            if name in out:  # held by several ranks: DeepSpeed gathers the same values on each
                for s, t in states.items():
                    assert torch.equal(out[name][s], t), (name, s, r)
            out[name] = states
    return out, recs


@pytest.fixture(scope="module")
def moe_saved(tmp_path_factory):
    """``dp, data_first -> (checkpoint, gathered)``: a DeepSpeed MoE checkpoint (4 experts, ep=2,
    ZeRO-2) on ``dp`` ranks and what the job held when it saved it, made once."""
    pytest.importorskip("deepspeed", reason="install DeepSpeed 0.19.8 to run the real-engine tests")
    cache = {}

    def get(dp: int, data_first: bool):
        if (dp, data_first) not in cache:
            root = tmp_path_factory.mktemp("ds-moe-src")
            _job(dp, str(root / "ckpt"), "--mode", "moe", "--experts", "4", "--ep", "2", "--scheduler",
                 *(["--data-before-expert"] if data_first else []))
            cache[(dp, data_first)] = root / "ckpt", root / "ckpt.gathered"
        return cache[(dp, data_first)]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("src_dp, data_first, ep, dp, zero", [
    (2, False, 2, 4, 2), (2, False, 1, 2, 2), (2, False, 4, 4, 1), (4, True, 2, 2, 2)])
def test_stock_deepspeed_moe_loads_what_ucp_wrote(moe_saved, tmp_path, src_dp, data_first, ep, dp, zero):
    """ep=2 dp=2 -> ep=2 dp=4 (expert groups cut over 2 ranks instead of 1), ep=1 (every rank holds
    all 4 experts), ep=4 under ZeRO-1, and ep=2 dp=4 saved in DeepSpeed's data-before-expert order ->
    ep=2 dp=2 (default order): the loading job's gathered masters, moments, weights, frozen
    parameter, buffers, step and scheduler equal the saving job's, bit for bit."""
    import ucp

    src, gathered = moe_saved(src_dp, data_first)
    want, want_recs = _by_global(gathered, 2, data_first)
    out = tmp_path / "ds"
    ucp.reshard(str(src), str(out), topology=f"dp={dp},ep={ep},zero={zero}", engine="deepspeed", progress=False)
    _job(dp, str(tmp_path / "load"), "--mode", "moe", "--experts", "4", "--ep", str(ep), "--scheduler",
         "--zero", str(zero), "--steps", "0", "--load", str(out))
    got, got_recs = _by_global(tmp_path / "load.gathered", ep)
    assert set(got) == set(want) and len(want) > 8
    for name, states in want.items():
        assert set(states) == set(got[name]) == {"fp32", "param", "exp_avg", "exp_avg_sq"}, name
        for s, t in states.items():
            assert t.dtype == got[name][s].dtype and torch.equal(t, got[name][s]), (name, s)
    for rec in got_recs:
        for key in ("frozen", "buffers"):
            assert set(rec[key]) == set(want_recs[0][key]) and rec[key]
            assert all(torch.equal(rec[key][n], want_recs[0][key][n]) for n in rec[key]), key
        assert rec["step"] == want_recs[0]["step"] == 3
        assert rec["lr_scheduler"] == want_recs[0]["lr_scheduler"] and rec["lr_scheduler"]["last_batch_iteration"] == 2
    if ep == 2 and dp == 4:  # through ucp convert's universal checkpoint: the same files
        ucp.convert(str(src), str(tmp_path / "u"), progress=False)
        ucp.reshard(str(tmp_path / "u"), str(tmp_path / "via"), topology=f"dp={dp},ep={ep},zero={zero}",
                    engine="deepspeed", progress=False)
        _assert_same_files(out / "global_step3", tmp_path / "via" / "global_step3")
