"""The layouts DeepSpeed records about tp/pp/ep (``_mp``, ``_moe``): joining, validation, refusals.

Real checkpoints are in test_convert_deepspeed_mp.py (slow); these are the rules on small inputs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ucp import ConvertError, CorruptCheckpointError
from ucp.engines.deepspeed._moe import expert_ranks, global_expert_name, local_expert_count
from ucp.engines.deepspeed._mp import AffineMap, MpLayout, affine_maps


def _split_map(shape: tuple[int, int], dim: int, sizes: list[int]) -> dict:
    """An affine map entry as DeepSpeed writes it: ``shape`` cut along ``dim`` into ``sizes``."""
    rows, cols = shape
    ranks, start = {}, 0
    for r, n in enumerate(sizes):
        shard = (n, cols) if dim == 0 else (rows, n)
        src = start * cols if dim == 0 else start
        ranks[r] = {"shard_shape": list(shard), "pieces": [
            {"shape": list(shard), "source": [src, [cols, 1]], "dest": [0, [shard[1], 1]], "locations": [r]}]}
        start += n
    return {"logical_shape": list(shape), "ranks": ranks}


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 9), dim=st.integers(0, 1), data=st.data())
def test_cut_then_join_is_the_identity(rows, cols, dim, data):
    """Uneven splits (GQA heads that do not divide tp) included: joining the cut gives the tensor back."""
    total = (rows, cols)[dim]
    cuts = sorted(data.draw(st.lists(st.integers(0, total), min_size=1, max_size=3)))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [total])]
    full = torch.randn(rows, cols).to(torch.bfloat16)
    amap = AffineMap.from_dict(_split_map((rows, cols), dim, sizes), "t")
    shards, start = {}, 0
    for r, n in enumerate(sizes):
        shards[r] = (full[start:start + n] if dim == 0 else full[:, start:start + n]).clone()
        start += n
    got = amap.join({r: shards[r] for r in amap.readers()}, "param", "t")
    assert got.dtype == full.dtype and torch.equal(got, full)


def test_a_replicated_block_is_read_from_its_lowest_holder_only():
    entry = {"logical_shape": [4], "ranks": {r: {"shard_shape": [4], "pieces": [
        {"shape": [4], "source": [0, [1]], "dest": [0, [1]], "locations": [0, 1]}]} for r in (0, 1)}}
    amap = AffineMap.from_dict(entry, "t")
    assert amap.readers() == [0]
    assert torch.equal(amap.join({0: torch.arange(4.0)}, "exp_avg", "t"), torch.arange(4.0))


def test_damaged_maps_are_refused():
    entry = _split_map((4, 2), 0, [2, 2])
    entry["ranks"][1]["pieces"][0]["source"][0] = 6  # rows 3..4 of a 4-row tensor
    with pytest.raises(CorruptCheckpointError, match="lies outside"):
        AffineMap.from_dict(entry, "w")
    gap = _split_map((4, 2), 0, [2, 2])
    del gap["ranks"][1]
    with pytest.raises(CorruptCheckpointError, match="hold 4 of the 8 elements"):
        AffineMap.from_dict(gap, "w")
    with pytest.raises(CorruptCheckpointError, match="malformed affine map"):
        AffineMap.from_dict({"logical_shape": [4]}, "w")


def test_a_scaled_block_converts_weights_but_refuses_moments():
    entry = {"logical_shape": [2], "ranks": {0: {"shard_shape": [2], "pieces": [
        {"shape": [2], "source": [0, [1]], "dest": [0, [1]], "locations": [0], "scale": 0.5}]}}}
    amap = AffineMap.from_dict(entry, "b")
    assert torch.equal(amap.join({0: torch.tensor([1.0, 2.0])}, "fp32", "b"), torch.tensor([2.0, 4.0]))
    with pytest.raises(ConvertError, match="exp_avg .* scaled by 0.5"):
        amap.join({0: torch.tensor([1.0, 2.0])}, "exp_avg", "b")


def test_tensor_parallel_without_a_recorded_layout_asks_for_a_spec():
    with pytest.raises(ConvertError, match=r"tp=2, but the checkpoint does not record how 1 .*'w'.*--spec"):
        MpLayout.derive(2, 1, lambda mp: ["w"], None, "ckpt")
    info = {"affine_map": {"version": 1, "params": {r"^w$": _split_map((4, 2), 0, [2, 2])}},
            "autotp_unsupported_parameter_patterns": {r"^odd$": "a fused layout"}}
    layout = MpLayout.derive(2, 1, lambda mp: ["w"], info, "ckpt")
    assert layout.shape("w", (2, 2)) == (4, 2) and layout.mp_ranks("w") == [0, 1]
    with pytest.raises(ConvertError, match="'odd' as not convertible \\(a fused layout\\)"):
        affine_maps(info, ["odd"], "ckpt")
    with pytest.raises(ConvertError, match="affine map version 2"):
        affine_maps({"affine_map": {"version": 2, "params": {}}}, ["w"], "ckpt")


def test_pipeline_stages_are_collected_and_a_tied_module_read_from_the_first_stage():
    stages = {0: ["tied_modules.embed.weight", "1.fc.weight"], 1: ["2.fc.weight", "tied_modules.embed.weight"]}
    layout = MpLayout.derive(1, 2, lambda mp: stages[mp], None, "ckpt")
    assert dict(layout.local) == {"tied_modules.embed.weight": 0, "1.fc.weight": 0, "2.fc.weight": 1}
    assert layout.mp_ranks("2.fc.weight") == [1]


def test_local_experts_get_global_ids():
    names = ["m.deepspeed_experts.0.w", "m.deepspeed_experts.1.w", "m.gate.w"]
    n = local_expert_count(names, "f")
    assert n == 2
    assert global_expert_name(names[1], 3, n) == "m.deepspeed_experts.7.w"  # ep rank 3, local 1
    assert global_expert_name("m.gate.w", 3, n) == "m.gate.w"
    assert expert_ranks(8, 2, 1, "f") == [1, 5]  # dp 8, ep 4: ep rank 1's expert-data-parallel group
    assert expert_ranks(8, 2, 1, "f", data_before_expert=True) == [2, 3]  # DeepSpeed's D + E order
    with pytest.raises(CorruptCheckpointError, match="local expert ids"):
        local_expert_count(["m.deepspeed_experts.1.w"], "f")


def _set_partition_counts(fake, counts) -> None:
    for f in fake.tag_dir.glob("*optim_states.pt"):
        sd = torch.load(f, weights_only=True)
        sd["optimizer_state_dict"]["partition_count"] = counts
        torch.save(sd, f)


@pytest.mark.parametrize("stage,match", [(2, "holds no MoE expert parameters"), (3, "MoE under ZeRO-3 is not supported")])
def test_groups_on_fewer_ranks_without_experts_or_under_zero3_are_refused(fake_zero, stage, match):
    """Mixed partition counts mean MoE expert groups; anything else is refused, never read as dp groups."""
    from ucp.engines.deepspeed._reader import DeepSpeedCheckpoint

    fake = fake_zero(stage=stage, dp=2, groups=[[("a.weight", (4, 3))], [("b.bias", (5,))]])
    _set_partition_counts(fake, [2, 1])
    with pytest.raises(ConvertError, match=match):
        with DeepSpeedCheckpoint(fake.root) as ckpt:
            ckpt.read("b.bias", "fp32")
