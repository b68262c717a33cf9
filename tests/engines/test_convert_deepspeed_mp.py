"""`ucp convert` (auto-detect, no spec) of DeepSpeed PipelineModule, AutoTP and MoE checkpoints equals,
bit for bit, what DeepSpeed itself gathers in the job (``safe_get_full_fp32_param``,
``safe_get_full_optimizer_state``), for every parameter and state, plus frozen parameters and buffers."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main

#: ds_mp_checkpoint's configurations (tests/engines/conftest.py DS_MP_CONFIGS)
KEYS = ["pipe_pp2", "pipe_pp2_dp2", "autotp_tp2", "autotp_tp2_uneven", "moe_ep2_z2", "moe_ep2_dp4_z2",
        "moe_ep2_dp4_z2_dbe"]
EXPERT = re.compile(r"(.*\.deepspeed_experts\.)(\d+)(\..*)")


def _convert(src, dst) -> ucp.UniversalCheckpoint:
    res = CliRunner().invoke(main, ["convert", str(src), str(dst), "-q"])
    assert res.exit_code == 0, res.output
    assert "found deepspeed" in res.stderr
    return ucp.open(str(dst))


def _gathered(gathered_dir) -> list[dict]:
    return [torch.load(gathered_dir / f"rank-{r}.pt", weights_only=True)
            for r in range(len(list(gathered_dir.glob("rank-*.pt"))))]


def _affine_maps(src) -> dict:
    """DeepSpeed's own affine maps (its ParamAffineMap cuts our full tensors back into its shards)."""
    from deepspeed.checkpoint.affine import ParamAffineMap

    tag = (src / "latest").read_text().strip()
    info = torch.load(src / tag / "mp_rank_00_model_states.pt", weights_only=True)["universal_checkpoint_info"]
    return {re.sub(r"\\(.)", r"\1", p.strip("^$")): ParamAffineMap.from_dict(e)
            for p, e in info["affine_map"]["params"].items()}


def _expert_name(local: str, ep_rank: int, local_experts: int) -> str:
    m = EXPERT.fullmatch(local)  # local expert l of expert-parallel rank e is global expert e * n + l
    return f"{m[1]}{ep_rank * local_experts + int(m[2])}{m[3]}" if m else local


def _ep_rank(key: str, rank: int, world: int, ep: int = 2) -> int:
    """DeepSpeed's expert-parallel rank of a data-parallel rank (E + D order, or D + E: ``dbe``)."""
    return rank // (world // ep) if key.endswith("dbe") else rank % ep


def _check_rank(ckpt, ref: dict, rank: int, key: str, maps: dict, world: int) -> set[str]:
    """Every state DeepSpeed gathered on ``rank`` equals the converted one (cut to the rank's shard)."""
    seen = set()
    for local, states in ref["params"].items():
        name = _expert_name(local, _ep_rank(key, rank, world), 2) if key.startswith("moe") else local
        seen.add(name)
        for state, want in states.items():
            got = ckpt.read(name, state)
            if key.startswith("autotp"):
                got = maps[name].extract(got, rank)
            assert got.dtype == want.dtype and torch.equal(got, want.view(got.shape)), (rank, name, state)
    for name, want in ref["frozen"].items():
        info = ckpt.info(name)
        seen.add(name)
        got = ckpt.read(name, "param")
        got = maps[name].extract(got, rank) if key.startswith("autotp") else got
        assert info.frozen and torch.equal(got, want.view(got.shape)), name
    for name, want in ref["buffers"].items():
        assert torch.equal(ckpt.read_buffer(name), want), name
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("key", KEYS)
def test_convert_without_spec_equals_deepspeeds_gather(ds_mp_checkpoint, tmp_path, key):
    if key.startswith("autotp"):
        pytest.importorskip("transformers", reason="AutoTP shards a transformers Llama")
    src, gathered = ds_mp_checkpoint(key)
    ckpt = _convert(src, tmp_path / "u")
    assert ckpt.engine == "deepspeed" and ckpt.step == 3
    want_topology = {"pipe_pp2": "dp=1,tp=1,pp=2", "pipe_pp2_dp2": "dp=2,tp=1,pp=2", "moe_ep2_z2": "dp=2,tp=1,pp=1",
                     "moe_ep2_dp4_z2": "dp=4,tp=1,pp=1", "moe_ep2_dp4_z2_dbe": "dp=4,tp=1,pp=1"}
    assert str(ckpt.topology).startswith(want_topology.get(key, "dp=1,tp=2,pp=1")), ckpt.topology
    maps = _affine_maps(src) if key.startswith("autotp") else {}
    seen = set()
    refs = _gathered(gathered)
    for rank, ref in enumerate(refs):
        seen |= _check_rank(ckpt, ref, rank, key, maps, len(refs))
    assert seen == set(ckpt.names())  # nothing converted that DeepSpeed does not hold, nothing missed
    for name in ckpt.names():  # every trainable parameter kept its model-dtype weights and both moments
        info = ckpt.info(name)
        assert info.frozen or {"param", "fp32", "exp_avg", "exp_avg_sq"} <= set(info.states), (name, info.states)
    assert [g["name"] for g in ckpt.param_groups][:2] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in ckpt.param_groups][:2] == [0.1, 0.0]
    if key.startswith("pipe"):  # the tied embedding is one parameter, and every block's buffer is kept
        assert "tied_modules.embed.weight" in seen and sorted(ckpt.buffer_names()) == ["1.gain", "2.gain", "3.gain"]
    if key.startswith("moe"):  # four global experts from two ranks of two local experts each
        assert {m[2] for n in ckpt.names() if (m := EXPERT.fullmatch(n))} == {"0", "1", "2", "3"}


@pytest.mark.slow
@pytest.mark.parametrize("key", ["autotp_tp2", "autotp_tp2_uneven"])
def test_export_of_autotp_loads_in_transformers_with_equal_logits(ds_mp_checkpoint, tmp_path, key):
    """The AutoTP Llama, exported straight from DeepSpeed's files, is the model DeepSpeed's own
    gathered fp32 weights make: same names, bit-equal logits."""
    transformers = pytest.importorskip("transformers", reason="AutoTP shards a transformers Llama")
    src, gathered = ds_mp_checkpoint(key)
    config = gathered / "config.json"
    res = CliRunner().invoke(main, ["export", str(src), str(tmp_path / "hf"), "--dtype", "fp32",
                                    "--config", str(config), "-q"])
    assert res.exit_code == 0, res.output
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    maps, refs = _affine_maps(src), _gathered(gathered)
    state = {n: maps[n].rebuild({r: ref["params"][n]["fp32"] for r, ref in enumerate(refs)})
             for n in refs[0]["params"]}
    state.update({n: t.float() for n, t in refs[0]["frozen"].items()})
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_json_file(config))
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = torch.arange(12).remainder(reference.config.vocab_size).view(2, 6)
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, reference.eval()(ids).logits)
