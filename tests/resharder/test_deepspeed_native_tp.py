"""``ucp.reshard(..., topology="tp=T,dp=N,zero=K", engine="deepspeed")``: DeepSpeed's native AutoTP files.

The slow tests save a real AutoTP DeepSpeed job (a tiny transformers Llama, ``tests/engines/_ds_train_mp.py``)
and record what DeepSpeed itself gathers per parameter; ucp writes the checkpoint for another tp/dp; a
stock AutoTP job of that size loads ucp's files with plain ``engine.load_checkpoint`` (the same script,
``--load``: no ucp import) and must hold, on each rank, bit for bit what the source job held for that
rank's shard: fp32 masters, Adam moments, weights, the frozen norm, step and LR scheduler state. Shards
of a tp the source did not run at are cut from its full tensors by DeepSpeed's own affine maps
(``ParamAffineMap.extract``, recorded by a real AutoTP job at that tp), not by ucp's rules.
The fast tests check the files against the cutting rules and the refusals, without DeepSpeed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from ucp.testing import run_command, scaled_timeout

HERE = Path(__file__).resolve().parent
TRAIN = HERE.parent / "engines" / "_ds_train_mp.py"


def _engines_conftest():
    """tests/engines/conftest.py (the fake-checkpoint writer, free_port), under a name of its own."""
    import importlib.util

    name = "ucp_tests_engines_conftest_native_tp"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE.parent / "engines" / "conftest.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_engines = _engines_conftest()

L0 = "model.layers.0."
LLAMA = [[("model.embed_tokens.weight", (10, 4)), (L0 + "self_attn.q_proj.weight", (8, 4)),
          (L0 + "self_attn.k_proj.weight", (4, 4)), (L0 + "self_attn.o_proj.weight", (4, 8)),
          (L0 + "mlp.gate_proj.weight", (5, 4)), (L0 + "mlp.down_proj.weight", (4, 5)), ("lm_head.weight", (7, 4))],
         [(L0 + "input_layernorm.weight", (4,))]]


def _fake(tmp_path, groups=LLAMA):
    return _engines.write_fake_zero(tmp_path / "ds", stage=1, dp=1, groups=groups,
                                    frozen=[("model.norm.weight", (4,))])


def _rows(total: int, tp: int) -> list[int]:
    return [total // tp + (1 if r < total % tp else 0) for r in range(tp)]


# --- fast: the files, without DeepSpeed ------------------------------------------------------------

@pytest.mark.parametrize("tp, dp", [(2, 1), (2, 3), (3, 2)])
def test_each_tp_rank_holds_its_shard(tmp_path, tp, dp):
    """Column weights cut along dim 0, row weights along dim 1 (near-evenly: the first ranks get one
    more), embeddings and norms whole; each tp rank's dp partitions put back together are its
    shards' fp32 masters and moments, in the optimizer's order."""
    import ucp

    groups = LLAMA if tp == 2 else [[(n, s) for n, s in g if not re.search(r"[qko]_proj", n)]
                                    for g in LLAMA]
    fake = _fake(tmp_path, groups)
    out = tmp_path / "out"
    ucp.reshard(str(fake.root), str(out), topology=f"tp={tp},dp={dp},zero=1", engine="deepspeed", progress=False)
    tag = out / (out / "latest").read_text()
    for t in range(tp):
        model = torch.load(tag / f"mp_rank_{t:02d}_model_states.pt", weights_only=True)
        assert model["mp_world_size"] == tp and model["checkpoint_parallel_dimensions"]["tp_degree"] == tp

        def shard(name, state):
            full = fake.expected[name][state]
            module = name.rsplit(".", 2)[-2]
            dim = 0 if module in ("q_proj", "k_proj", "gate_proj", "lm_head") else None
            dim = 1 if module in ("o_proj", "down_proj") else dim
            if dim is None:
                return full
            sizes = _rows(full.shape[dim], tp)
            return full.narrow(dim, sum(sizes[:t]), sizes[t])

        for name in fake.expected:
            assert torch.equal(model["module"][name], shard(name, "param")), (t, name)
        osds = [torch.load(tag / f"bf16_zero_pp_rank_{r}_mp_rank_{t:02d}_optim_states.pt",
                           weights_only=True)["optimizer_state_dict"] for r in range(dp)]
        for g, names in enumerate(fake.groups):
            want = {s: torch.cat([shard(n, s).reshape(-1) for n in names]) for s in ("fp32", "exp_avg", "exp_avg_sq")}
            fp32 = torch.cat([o["single_partition_of_fp32_groups"][g] for o in osds])
            assert torch.equal(fp32[:want["fp32"].numel()], want["fp32"]), (t, g)
            for s in ("exp_avg", "exp_avg_sq"):
                got = torch.cat([o["base_optimizer_state"]["state"][g][s] for o in osds])
                assert torch.equal(got[:want[s].numel()], want[s]) and not got[want[s].numel():].any(), (t, g, s)
            assert [list(v) for v in model["param_shapes"][g].values()] == [list(shard(n, "param").shape)
                                                                           for n in names]


BIASED = [[(n, s) for n, s in LLAMA[0]] + [(L0 + "self_attn.q_proj.bias", (8,)), (L0 + "self_attn.k_proj.bias", (4,)),
                                          (L0 + "self_attn.o_proj.bias", (4,)), (L0 + "mlp.gate_proj.bias", (5,)),
                                          (L0 + "mlp.down_proj.bias", (4,))], LLAMA[1]]
#: 6 heads of 2 rows, 3 kv heads: DeepSpeed gives tp rank 0 of 2 two kv heads (and four q heads), rank 1 one.
UNEVEN = [[("model.embed_tokens.weight", (10, 4)), (L0 + "self_attn.q_proj.weight", (12, 4)),
           (L0 + "self_attn.k_proj.weight", (6, 4)), (L0 + "self_attn.o_proj.weight", (4, 12)),
           (L0 + "mlp.gate_proj.weight", (5, 4))], [(L0 + "input_layernorm.weight", (4,))]]


def _shard(full: torch.Tensor, name: str, tp: int, t: int, rows=_rows) -> torch.Tensor:
    """tp rank ``t``'s shard of ``full`` by AutoTP's rules (``rows(total, tp)``: the attention split;
    the others near-even)."""
    module, kind = name.rsplit(".", 2)[-2:]
    dim = 0 if module in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head") else None
    dim = 1 if module in ("o_proj", "down_proj") and kind == "weight" else dim
    if dim is None:
        return full
    sizes = (rows if module in ("q_proj", "k_proj", "v_proj", "o_proj") else _rows)(full.shape[dim], tp)
    return full.narrow(dim, sum(sizes[:t]), sizes[t])


def _heads(kv: int):
    """DeepSpeed's split by ``kv`` heads: the first ``kv % tp`` ranks hold one more."""
    return lambda total, tp: [total * (kv // tp + (r < kv % tp)) // kv for r in range(tp)]


@pytest.mark.parametrize("groups, zero, spec, rows", [
    (BIASED, 1, None, _rows), (BIASED, 3, None, _rows), (UNEVEN, 2, "heads = 6\nkv_heads = 3", _heads(3)),
    (UNEVEN, 3, "kv_heads = 3", _heads(3))])
def test_biases_heads_and_zero3_as_the_reader_sees_them(tmp_path, groups, zero, spec, rows):
    """Read back per tp rank by ucp's DeepSpeed reader (checked against real DeepSpeed files
    elsewhere): column biases cut like their weight, row biases whole, attention cut by the spec's
    kv heads (uneven: 2 + 1), ZeRO-3's per-(dp, tp) model and optimizer files."""
    import ucp
    from ucp.engines.deepspeed._reader import DeepSpeedCheckpoint

    fake = _fake(tmp_path, groups)
    out = tmp_path / "out"
    ucp.reshard(str(fake.root), str(out), topology=f"tp=2,dp=2,zero={zero}", engine="deepspeed", spec=spec,
                progress=False)
    tag = out / (out / "latest").read_text()
    model_files = sorted(p.name for p in tag.glob("*model_states.pt"))
    assert model_files == ([f"zero_pp_rank_{r}_mp_rank_{t:02d}_model_states.pt" for r in range(2) for t in range(2)]
                           if zero == 3 else ["mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"])
    ckpt = DeepSpeedCheckpoint(out, allow_unsafe_pickle=zero == 3)  # ZeRO-3 files name DeepSpeed's LossScaler
    assert ckpt.zero_stage == zero and ckpt.tp_size == 2 and ckpt.dp_size == 2
    for t in range(2):
        for name in [n for g in fake.groups for n in g] + fake.frozen:
            for state in ("fp32", "exp_avg", "exp_avg_sq") if name not in fake.frozen else ("param",):
                want = _shard(fake.expected[name][state], name, 2, t, rows)
                got = ckpt.read(name, state, mp_rank=t)
                assert got.dtype == want.dtype and torch.equal(got, want), (t, name, state)


@pytest.mark.parametrize("groups, topology, spec, words", [
    (None, "tp=2,pp=2,dp=1,zero=1", None, "needs pp=1"),
    (None, "tp=3,dp=1,zero=1", None, "'model.layers.0.self_attn.q_proj.weight' has 8 along dim 0, not a multiple of "
                                     "tp=3: DeepSpeed cuts it by kv heads, unevenly here, and the source does not "
                                     "record the head count; pass the loading model's head count: --config"),
    (UNEVEN, "tp=4,dp=1,zero=1", "kv_heads = 3", "'model.layers.0.self_attn.q_proj.weight' is cut by the spec's "
                                                "kv_heads = 3, fewer than tp=4"),
    (UNEVEN, "tp=2,dp=1,zero=1", "kv_heads = 4", "'model.layers.0.self_attn.k_proj.weight' has 6 along dim 0, not a "
                                                "multiple of the spec's kv_heads = 4"),
    (UNEVEN, "tp=2,dp=1,zero=1", "heads = 6\nkv_heads = 4", "the spec's heads = 6 is not a multiple of kv_heads = 4"),
    ([[("model.layers.0.mlp.fc.weight", (4, 4))]], "tp=2,dp=1,zero=1", None, "'model.layers.0.mlp.fc.weight'"),
    ([[("model.layers.0.mlp.fc.bias", (4,))]], "tp=2,dp=1,zero=1", None, "'model.layers.0.mlp.fc.bias'"),
    ([[("lm_head.weight", (1, 4))]], "tp=2,dp=1,zero=1", None, "'lm_head.weight' has 1 along dim 0, fewer than tp=2"),
])
def test_refuses_what_it_cannot_place_before_writing(tmp_path, groups, topology, spec, words):
    import ucp

    fake = _fake(tmp_path, groups or LLAMA)
    with pytest.raises(ucp.TopologyError, match=re.escape(words)):
        ucp.reshard(str(fake.root), str(tmp_path / "out"), topology=topology, engine="deepspeed", spec=spec,
                    progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_config_gives_the_head_counts(tmp_path):
    """``ucp reshard --config config.json``: the Hugging Face config's num_key_value_heads cut attention
    (DeepSpeed's uneven split); --config with another engine, or beside --spec, is refused."""
    import json

    from click.testing import CliRunner

    from ucp.cli import main

    fake = _fake(tmp_path, UNEVEN)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 4}))
    base = ["reshard", str(fake.root), str(tmp_path / "out"), "--to", "tp=2,dp=1,zero=1", "-q"]
    for extra, words in ((["--engine", "ucp", "--config", str(config)], "to --engine deepspeed (AutoTP"),
                         (["--engine", "deepspeed", "--config", str(config), "--spec", "kv_heads = 3"], "without --spec")):
        got = CliRunner().invoke(main, base + extra)
        assert got.exit_code != 0 and words in got.output, got.output
    got = CliRunner().invoke(main, base + ["--engine", "deepspeed", "--config", str(config)])
    assert got.exit_code == 0, got.output
    tag = tmp_path / "out" / "global_step3"
    k = [torch.load(tag / f"mp_rank_{t:02d}_model_states.pt", weights_only=True)["module"]
         [L0 + "self_attn.k_proj.weight"] for t in range(2)]
    assert [x.shape[0] for x in k] == [4, 2] and torch.equal(torch.cat(k), fake.expected[L0 + "self_attn.k_proj.weight"]
                                                                ["param"])


# --- slow: stock AutoTP DeepSpeed jobs save and load ------------------------------------------------

def _job(ranks: int, out: Path, *args: str, heads: tuple[int, int] = (4, 2), bias: bool = False) -> Path:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(_engines.free_port()), str(TRAIN), str(out), "--mode", "autotp",
           "--heads", str(heads[0]), "--kv-heads", str(heads[1]), "--scheduler", *args] + (["--bias"] if bias else [])
    run_command(cmd, what=f"AutoTP DeepSpeed job on {ranks} ranks", timeout=scaled_timeout(300))
    return out.with_name(out.name + ".gathered")


def _records(gathered: Path) -> list[dict]:
    return [torch.load(gathered / f"rank-{r}.pt", weights_only=True)
            for r in range(len(list(gathered.glob("rank-*.pt"))))]


@pytest.fixture(scope="module")
def autotp_saved(tmp_path_factory):
    """``(tp, heads, bias, zero) -> (save dir, per-rank records)`` of a real AutoTP job on tp ranks (dp=1,
    ZeRO-1 unless ``zero``), made once; the model's Hugging Face config is ``<save dir>.gathered/config.json``."""
    pytest.importorskip("deepspeed", reason="install DeepSpeed 0.19.8 to run the real-engine tests")
    pytest.importorskip("transformers", reason="AutoTP shards a transformers Llama")
    cache = {}

    def get(tp: int, heads: tuple[int, int] = (4, 2), bias: bool = False, zero: int = 1):
        key = tp, heads, bias, zero
        if key not in cache:
            out = tmp_path_factory.mktemp(f"autotp-tp{tp}-h{heads[0]}-{heads[1]}{'-bias' * bias}-z{zero}") / "ckpt"
            cache[key] = out, _records(_job(tp, out, "--tp", str(tp), "--zero", str(zero), heads=heads, bias=bias))
        return cache[key]

    return get


def _affine(src: Path) -> dict:
    """DeepSpeed's own affine maps, as a real AutoTP job at that tp recorded them."""
    from deepspeed.checkpoint.affine import ParamAffineMap

    tag = (src / "latest").read_text().strip()
    info = torch.load(src / tag / "mp_rank_00_model_states.pt", weights_only=True)["universal_checkpoint_info"]
    return {re.sub(r"\\(.)", r"\1", p.strip("^$")): ParamAffineMap.from_dict(e)
            for p, e in info["affine_map"]["params"].items()}


def _cut(record: dict, maps: dict | None, tp_rank: int) -> dict:
    """A full-model record cut to tp rank ``tp_rank``'s shards by DeepSpeed's maps (None: as is)."""
    if maps is None:
        return record

    def cut(name, t):
        return maps[name].extract(t, tp_rank).contiguous() if name in maps else t

    return {**record, "params": {n: {s: cut(n, v) for s, v in st.items()} for n, st in record["params"].items()},
            "frozen": {n: cut(n, v) for n, v in record["frozen"].items()}}


def _join(records: list[dict], maps: dict) -> dict:
    """Per-tp-rank records joined into full tensors by DeepSpeed's maps (``rebuild``)."""

    def join(name, pick):
        if name not in maps:
            return pick(records[0])
        return maps[name].rebuild({r: pick(rec) for r, rec in enumerate(records)})

    first = records[0]
    return {**first, "params": {n: {s: join(n, lambda rec: rec["params"][n][s]) for s in st}
                                for n, st in first["params"].items()},
            "frozen": {n: join(n, lambda rec: rec["frozen"][n]) for n in first["frozen"]}}


def _assert_same(want, got, where=""):
    if isinstance(want, dict):
        assert set(want) == set(got), (where, set(want) ^ set(got))
        for k in want:
            _assert_same(want[k], got[k], f"{where}.{k}")
    elif isinstance(want, torch.Tensor):
        assert want.dtype == got.dtype and want.shape == got.shape and torch.equal(want, got), where
    else:
        assert want == got, (where, want, got)


@pytest.mark.slow
@pytest.mark.parametrize("src_tp, tp, dp, zero, via_universal", [
    (2, 2, 2, 1, False), (1, 2, 2, 1, False), (2, 2, 2, 1, True), (2, 1, 2, 1, False), (2, 2, 2, 2, False),
    (2, 2, 2, 3, False)])
def test_stock_autotp_job_loads_what_ucp_wrote(autotp_saved, tmp_path, src_tp, tp, dp, zero, via_universal):
    """Saved by AutoTP at ``src_tp`` (dp=1, ZeRO-1), written by ucp for tp x dp at ``zero``, loaded by
    a stock AutoTP job of tp x dp ranks: each rank holds what the source held for its shard (tp rank =
    rank % tp); at tp=1 every rank holds the source's shards joined."""
    import ucp

    src, truth = autotp_saved(src_tp)
    if src_tp > tp == 1:  # the plain job holds whole tensors: the source's shards joined
        truth = [_join(truth, _affine(src))]
    assert truth[0]["step"] == 3 and truth[0]["lr_scheduler"]["last_batch_iteration"] == 2
    assert truth[0]["frozen"] and all("exp_avg" in s for s in truth[0]["params"].values())
    if via_universal:
        ucp.convert(str(src), str(tmp_path / "u"), progress=False)
        src = tmp_path / "u"
    out = tmp_path / "ds"
    ucp.reshard(str(src), str(out), topology=f"tp={tp},dp={dp},zero={zero}", engine="deepspeed", progress=False)
    seen = _records(_job(tp * dp, tmp_path / "load", "--tp", str(tp), "--zero", str(zero), "--load", str(out),
                      "--steps", "0"))
    maps = _affine(autotp_saved(tp)[0]) if src_tp < tp else None
    for rank, got in enumerate(seen):
        want = truth[rank % tp] if src_tp >= tp else _cut(truth[0], maps, rank % tp)
        _assert_same(want, got, f"rank {rank}")


@pytest.mark.slow
def test_uneven_kv_heads_follow_the_sources_split(autotp_saved, tmp_path):
    """6 heads, 3 kv heads at tp=2: DeepSpeed gives tp rank 0 two kv heads and rank 1 one. ucp reads the
    head count off the source's shards, writes tp=2 x dp=2 by the same rule, and a stock job loads it
    bit for bit; tp=4 (more ranks than kv heads) is refused before writing, naming the parameter."""
    import ucp

    src, truth = autotp_saved(2, (6, 3))
    with pytest.raises(ucp.TopologyError, match=r"attention parameter 'model\.layers\.0\.self_attn\.q_proj\.weight' "
                                                 r"is cut by the source's 3 kv heads, fewer than tp=4"):
        ucp.reshard(str(src), str(tmp_path / "tp4"), topology="tp=4,dp=1,zero=1", engine="deepspeed", progress=False)
    assert not (tmp_path / "tp4").exists()
    with pytest.raises(ucp.TopologyError, match=r"the spec's kv_heads = 2, but .* uneven AutoTP split shows 3 kv heads"):
        ucp.reshard(str(src), str(tmp_path / "two"), topology="tp=2,dp=1,zero=1", engine="deepspeed",
                    spec="kv_heads = 2", progress=False)
    assert not (tmp_path / "two").exists()
    out = tmp_path / "ds"
    ucp.reshard(str(src), str(out), topology="tp=2,dp=2,zero=1", engine="deepspeed", progress=False)
    shard = torch.load(out / "global_step3" / "mp_rank_01_model_states.pt", weights_only=True)["module"]
    assert shard["model.layers.0.self_attn.k_proj.weight"].shape[0] == 4  # one kv head of 4 rows
    seen = _records(_job(4, tmp_path / "load", "--tp", "2", "--load", str(out), "--steps", "0", heads=(6, 3)))
    for rank, got in enumerate(seen):
        _assert_same(truth[rank % 2], got, f"rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize("via", ["tp1-spec", "universal-cli-config"])
def test_uneven_heads_and_biases_from_a_source_that_does_not_show_them(autotp_saved, tmp_path, via):
    """6 heads, 3 kv heads, every projection with a bias; the source does not show the head split (a
    plain tp=1 job, or the universal checkpoint of an AutoTP job), so the head count comes from the
    model's config: as spec constants through the API (tp=1 source -> tp=2 x dp=2, ZeRO-1), or
    ``ucp reshard --config config.json`` (universal -> tp=2 x dp=1, ZeRO-3). A stock AutoTP job loads
    it and holds bit for bit what DeepSpeed's own split gives: q/k/v weights and biases 2 + 1 kv heads,
    o_proj/down_proj biases whole on each tp rank."""
    import json

    import ucp
    from ucp.engines.deepspeed._native_tp import head_spec

    heads = (6, 3)
    tp2, truth2 = autotp_saved(2, heads, bias=True)
    config = tp2.with_name(tp2.name + ".gathered") / "config.json"
    out = tmp_path / "ds"
    if via == "tp1-spec":
        src, truth1 = autotp_saved(1, heads, bias=True)
        spec = head_spec(json.loads(config.read_text()), str(config))
        ucp.reshard(str(src), str(out), topology="tp=2,dp=2,zero=1", engine="deepspeed", spec=spec, progress=False)
        maps = _affine(tp2)
        truth, dp, zero = [_cut(truth1[0], maps, t) for t in range(2)], 2, 1
    else:
        ucp.convert(str(tp2), str(tmp_path / "u"), progress=False)
        from click.testing import CliRunner

        from ucp.cli import main

        got = CliRunner().invoke(main, ["reshard", str(tmp_path / "u"), str(out), "--to", "tp=2,dp=1,zero=3",
                                        "--engine", "deepspeed", "--config", str(config), "-q"])
        assert got.exit_code == 0, got.output
        truth, dp, zero = truth2, 1, 3
    k0 = "model.layers.0.self_attn.k_proj.bias"
    assert [t["params"][k0]["fp32"].shape[0] for t in truth] == [8, 4]  # DeepSpeed's split: 2 + 1 heads of 4
    seen = _records(_job(2 * dp, tmp_path / "load", "--tp", "2", "--zero", str(zero), "--load", str(out),
                         "--steps", "0", heads=heads, bias=True))
    for rank, got in enumerate(seen):
        _assert_same(truth[rank % 2], got, f"rank {rank}")


@pytest.mark.slow
def test_without_the_head_count_deepspeed_refuses_the_even_split(autotp_saved, tmp_path):
    """What docs/resharding.md says happens without a head count when tp does not divide the kv heads:
    the attention rows divide by tp (3 kv heads of 4 rows), so ucp cuts them evenly, and a stock
    ZeRO-1 AutoTP job stops at load_checkpoint with torch's size mismatch (DeepSpeed wants 2 + 1 heads)."""
    import ucp

    src, _truth = autotp_saved(1, (6, 3), bias=True)
    out = tmp_path / "ds"
    ucp.reshard(str(src), str(out), topology="tp=2,dp=1,zero=1", engine="deepspeed", progress=False)
    with pytest.raises(AssertionError, match=r"size mismatch for model\.layers\.\d\.self_attn\.[qkvo]_proj"):
        _job(2, tmp_path / "load", "--tp", "2", "--load", str(out), "--steps", "0", heads=(6, 3), bias=True)


@pytest.mark.slow
def test_zero3_autotp_source_to_more_data_parallel_ranks(autotp_saved, tmp_path):
    """DeepSpeed 0.19.8 trains AutoTP under ZeRO-3: ucp reads such a checkpoint (tp=2 x dp=1, biases,
    6 heads / 3 kv heads split 2 + 1) and writes it for tp=2 x dp=2 at ZeRO-3; a stock job loads it and
    holds, on each rank, what the saving job held for that tp rank, bit for bit."""
    import ucp

    src, truth = autotp_saved(2, (6, 3), bias=True, zero=3)
    assert [t["params"]["model.layers.0.self_attn.k_proj.bias"]["fp32"].shape[0] for t in truth] == [8, 4]
    out = tmp_path / "ds"
    ucp.reshard(str(src), str(out), topology="tp=2,dp=2,zero=3", engine="deepspeed", progress=False)
    seen = _records(_job(4, tmp_path / "load", "--tp", "2", "--zero", "3", "--load", str(out), "--steps", "0",
                         heads=(6, 3), bias=True))
    for rank, got in enumerate(seen):
        _assert_same(truth[rank % 2], got, f"rank {rank}")
