"""Layouts, names and consolidation policies, on small cases worked out by hand."""

from __future__ import annotations

import pytest
import torch

from ucp import Topology, UcpSpecError
from ucp.grammar import UclError, load_spec


def _regions(layout, rank):
    return [(p.global_region, p.local_region) for p in layout.pieces(rank)]


# -- splits ------------------------------------------------------------------------------------
def test_column_and_row_splits():
    spec = load_spec('param "col" split tp dim 0\nparam "row" split tp dim 1')
    topo = Topology(tp=2)
    col = spec.layout("col", (6, 4), topo)
    assert _regions(col, 1) == [(((3, 6), (0, 4)), ((0, 3), (0, 4)))]
    row = spec.layout("row", (6, 4), topo)
    assert _regions(row, 1) == [(((0, 6), (2, 4)), ((0, 6), (0, 2)))]
    assert row.local_shape(0) == (6, 2)


def test_fused_parts_are_split_each_on_their_own():
    spec = load_spec('param "gate_up" split tp dim 0 parts [4, 4]')
    layout = spec.layout("gate_up", (8, 3), Topology(tp=2))
    # rank 1 holds [gate rows 2..4; up rows 6..8]
    assert [p.global_region[0] for p in layout.pieces(1)] == [(2, 4), (6, 8)]
    assert [p.local_region[0] for p in layout.pieces(1)] == [(0, 2), (2, 4)]
    full = torch.arange(8.0).repeat(3, 1).T
    assert spec.cut("gate_up", full, Topology(tp=2), 1)[:, 0].tolist() == [2, 3, 6, 7]


def test_deepspeed_two_sub_params_equal_parts():
    spec = load_spec('param "h_to_4h" split tp dim 0 parts 2')
    frag = spec.cut("h_to_4h", torch.arange(8), Topology(tp=4), 3)
    assert frag.tolist() == [3, 7]


def test_gqa_groups_hold_q_then_k_then_v_per_group():
    # 4 query heads, 2 kv heads, head_dim 1: canonical rows are q0 q1 q2 q3 k0 k1 v0 v1
    spec = load_spec('param "qkv" split tp dim 0 groups 2 [2, 1, 1]')
    rows = torch.tensor([10, 11, 12, 13, 20, 21, 30, 31])
    assert spec.cut("qkv", rows, Topology(tp=1), 0).tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert spec.cut("qkv", rows, Topology(tp=2), 1).tolist() == [12, 13, 21, 31]


def test_balanced_split_gives_first_ranks_one_unit_more():
    spec = load_spec('param "w" split tp dim 0 balanced by 2')
    layout = spec.layout("w", (10,), Topology(tp=3))  # 5 units of 2 -> 2, 2, 1 units
    assert [layout.local_shape(r) for r in range(3)] == [(4,), (4,), (2,)]
    assert [p.global_region for p in layout.pieces(2)] == [((8, 10),)]
    with pytest.raises(UclError, match="not split evenly.*`balanced`"):
        load_spec('param "w" split tp dim 0').layout("w", (10,), Topology(tp=3))


def test_two_axes_on_one_dim_outer_first():
    spec = load_spec('param "experts" split ep, tp dim 0')
    topo = Topology(tp=2, ep=2)
    rank = topo.rank(ep=1, tp=0)
    assert spec.layout("experts", (8,), topo).pieces(rank)[0].global_region == ((4, 6),)


def test_split_over_dp_for_zero_style_sharding():
    spec = load_spec('param "w" split dp dim 1')
    layout = spec.layout("w", (2, 4), Topology(dp=2, tp=2))
    assert layout.policy("tp") == "first" and layout.policy("dp") is None
    assert layout.sources() == (0, 2)


# -- padding -----------------------------------------------------------------------------------
def test_vocab_padding_to_multiple_of_tp_times_n():
    spec = load_spec('vocab = 10\nparam "emb" split tp dim 0 pad vocab to multiple of 4')
    topo = Topology(tp=2)
    layout = spec.layout("emb", (10, 2), topo)
    assert layout.padded_shape == (16, 2)  # multiple of tp x 4 = 8
    assert [layout.local_shape(r) for r in range(2)] == [(8, 2), (8, 2)]
    assert layout.padding(0) == () and layout.padding(1) == ((0, 2, 8),)
    full = torch.randn(10, 2).to(torch.bfloat16)
    frags = {r: spec.cut("emb", full, topo, r) for r in range(2)}
    assert torch.equal(frags[1][:2], full[8:]) and not frags[1][2:].any()
    frags[1][2:] = 7  # whatever a padding row holds is dropped on consolidation
    assert torch.equal(spec.consolidate("emb", frags, topo), full)


def test_vocab_padding_to_explicit_size():
    spec = load_spec('param "emb" split tp dim 0 pad 10 to 12')
    layout = spec.layout("emb", (10,), Topology(tp=3))
    assert [layout.local_shape(r) for r in range(3)] == [(4,), (4,), (4,)]
    assert [p.global_region for p in layout.pieces(2)] == [((8, 10),)]
    assert layout.padding(2) == ((0, 2, 4),)


def test_unpadded_size_mismatch_names_the_rule():
    spec = load_spec('\n\nparam "emb" split tp dim 0 pad 10 to multiple of 4')
    with pytest.raises(UclError) as info:
        spec.layout("emb", (11, 2), Topology(tp=2))
    assert info.value.line == 3 and "unpadded size is 10" in info.value.message


# -- precedence and captures -------------------------------------------------------------------
def test_first_matching_rule_in_file_order_wins():
    spec = load_spec('''
param "layers.{i}.attn.{w:*}"  split tp dim 0
param "layers.{i}.attn.qkv"    split tp dim 1
default replicate tp
''')
    assert spec.rule_for("layers.3.attn.qkv").pos.line == 2  # not the more specific one
    assert spec.rule_for("embed").pattern is None  # default, wherever it is written
    problems = spec.check({"layers.3.attn.qkv": (4, 4), "embed": (2,)})
    assert [(p.kind, p.line) for p in problems] == [("unmatched", 3)]


@pytest.mark.parametrize("name, matches", [
    ("h.7.w", True), ("h.07.w", False), ("h.x.w", False), ("h.12.w", True), ("h..w", False)])
def test_number_capture(name, matches):
    assert (load_spec('param "h.{i}.w"').match(name) is not None) == matches


def test_segment_and_any_captures():
    spec = load_spec('param "a.{x:*}.w"\nparam "{path:**}.bias"')
    assert spec.match("a.b.w").captures == {"x": "b"}
    assert spec.match("a.b.c.w") is None
    assert spec.match("m.a.b.bias").captures == {"path": "m.a.b"}
    assert spec.match("w.bias.x") is None


def test_uncovered_parameter_is_an_error_naming_it():
    with pytest.raises(UcpSpecError, match="'other' matches no rule"):
        load_spec('param "w"').layout("other", (1,), Topology())


# -- pipeline stages ---------------------------------------------------------------------------
def test_layers_renumbered_per_stage_even():
    spec = load_spec('index {layer} over pp = 8\nparam "layers.{layer}.w" split tp dim 0')
    topo = Topology(tp=2, pp=4)
    assert spec.holders("layers.5.w", topo) == {4: "layers.1.w", 5: "layers.1.w"}
    assert spec.canonical_name("layers.1.w", topo, topo.rank(pp=3, tp=1)) == "layers.7.w"
    assert spec.local_name("layers.5.w", topo, 0) is None


def test_layers_renumbered_uneven_first_last_and_list():
    spec = load_spec('index {layer} over pp = 10 first 1 last 3\nparam "l.{layer}"')
    topo = Topology(pp=4)  # stages hold 1, 3, 3, 3 layers
    stages = {i: next(iter(spec.holders(f"l.{i}", topo).items())) for i in range(10)}
    assert [s for s, _ in stages.values()] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [n for _, n in stages.values()] == [f"l.{i}" for i in (0, 0, 1, 2, 0, 1, 2, 0, 1, 2)]
    listed = load_spec('index {layer} over pp = [3, 0, 2]\nparam "l.{layer}"')
    assert listed.holders("l.3", Topology(pp=3)) == {2: "l.0"}
    with pytest.raises(UclError, match="lists 3 counts, but pp=2"):
        listed.holders("l.3", Topology(pp=2))
    with pytest.raises(UclError, match="do not spread evenly"):
        load_spec('index {layer} over pp = 10\nparam "l.{layer}"').holders("l.0", Topology(pp=4))
    with pytest.raises(UclError, match="out of range"):
        listed.holders("l.5", Topology(pp=3))


def test_tied_parameter_kept_once_and_restored_to_every_stage():
    spec = load_spec('param "wte" split tp dim 0 stage first, last as "lm_head"')
    topo = Topology(tp=2, pp=3)
    assert spec.holders("wte", topo) == {0: "wte", 1: "wte", 4: "lm_head", 5: "lm_head"}
    full = torch.randn(4, 3)
    frags = {r: spec.cut("wte", full, topo, r) for r in spec.holders("wte", topo)}
    assert torch.equal(frags[0], frags[4]) and torch.equal(frags[1], frags[5])
    assert spec.layout("wte", (4, 3), topo).sources() == (0, 1)
    assert torch.equal(spec.consolidate("wte", frags, topo), full)
    frags[5] = frags[5] + 1
    with pytest.raises(UcpSpecError, match="ranks 1 and 5 differ"):
        spec.consolidate("wte", frags, topo)
    assert spec.canonical_name("lm_head", topo, 4) == "wte"
    # with one stage, the first listed name is the one used
    assert spec.holders("wte", Topology()) == {0: "wte"}


def test_parameter_without_stage_needs_one_when_pp_above_one():
    spec = load_spec('param "norm" replicate tp')
    assert spec.holders("norm", Topology(pp=1)) == {0: "norm"}
    with pytest.raises(UclError, match="no pipeline stage.*`stage last`"):
        spec.holders("norm", Topology(pp=2))
    everywhere = load_spec('param "norm" replicate tp, pp')
    assert sorted(everywhere.holders("norm", Topology(pp=2))) == [0, 1]


# -- experts -----------------------------------------------------------------------------------
def test_experts_renumbered_over_ep_and_stacked_experts_split():
    spec = load_spec('''
index {expert} over ep = 8
param "moe.experts.{expert}.w1" split tp dim 0
param "moe.stacked.w1" split ep dim 0
param "attn.w" split tp dim 0
''')
    topo = Topology(tp=2, ep=4)
    assert spec.holders("moe.experts.5.w1", topo) == {
        topo.rank(ep=2, tp=0): "moe.experts.1.w1", topo.rank(ep=2, tp=1): "moe.experts.1.w1"}
    assert spec.canonical_name("moe.experts.0.w1", topo, topo.rank(ep=3)) == "moe.experts.6.w1"
    stacked = spec.layout("moe.stacked.w1", (8, 2, 2), topo)
    assert stacked.pieces(topo.rank(ep=1))[0].global_region == ((2, 4), (0, 2), (0, 2))
    assert stacked.policy("tp") == "first"
    dense = spec.layout("attn.w", (4,), topo)  # dense params are copies on every ep rank
    assert dense.policy("ep") == "first" and len(dense.ranks()) == 8


# -- renames and transposes --------------------------------------------------------------------
def test_rename_and_transpose():
    spec = load_spec('''
param "layers.{i}.mlp.up.weight" engine "h.{i}.mlp.c_fc.weight" transpose split tp dim 0
''')
    topo = Topology(tp=2)
    full = torch.arange(12.0).reshape(6, 2)  # canonical [out, in]; the engine stores [in, out]
    frag = spec.cut("layers.0.mlp.up.weight", full, topo, 1)
    assert torch.equal(frag, full[3:].T)
    assert spec.layout("layers.0.mlp.up.weight", (6, 2), topo).local_shape(1) == (2, 3)
    assert spec.local_name("layers.0.mlp.up.weight", topo, 1) == "h.0.mlp.c_fc.weight"
    assert spec.canonical_name("h.4.mlp.c_fc.weight", topo, 0) == "layers.4.mlp.up.weight"
    frags = {r: spec.cut("layers.0.mlp.up.weight", full, topo, r) for r in range(2)}
    assert torch.equal(spec.consolidate("layers.0.mlp.up.weight", frags, topo), full)


def test_transpose_with_permutation():
    spec = load_spec('param "w" transpose [2, 0, 1] split tp dim 2')
    full = torch.randn(2, 3, 4)
    frag = spec.cut("w", full, Topology(tp=2), 0)
    assert torch.equal(frag, full[:, :, :2].permute(2, 0, 1))


def test_unknown_local_name_is_an_error():
    spec = load_spec('index {l} over pp = 4\nparam "l.{l}"')
    with pytest.raises(UcpSpecError, match="no rule"):
        spec.canonical_name("l.2", Topology(pp=2), 0)  # stage 0 holds local layers 0 and 1 only


# -- consolidation policies --------------------------------------------------------------------
def _copies(spec, name, full, topo):
    return {r: spec.cut(name, full, topo, r) for r in spec.holders(name, topo)}


def test_check_policy_detects_unequal_copies():
    spec = load_spec('param "norm" replicate tp check')
    topo = Topology(tp=3)
    frags = _copies(spec, "norm", torch.ones(4), topo)
    frags[2] = frags[2].clone()
    frags[2][1] = 2
    with pytest.raises(UcpSpecError, match="ranks 0 and 2 differ.*`average`"):
        spec.consolidate("norm", frags, topo)
    frags[2][1] = float("nan")
    frags[0] = frags[0].clone()
    frags[1] = frags[1].clone()
    frags[0][1] = frags[1][1] = float("nan")
    assert spec.consolidate("norm", frags, topo)[1].isnan()  # NaN copies count as equal


def test_average_policy_averages_unequal_copies_only():
    spec = load_spec('param "bias" replicate tp average')
    topo = Topology(tp=2)
    frags = {0: torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
             1: torch.tensor([3.0, 2.0], dtype=torch.bfloat16)}
    assert spec.consolidate("bias", frags, topo).tolist() == [2.0, 2.0]
    ints = {0: torch.tensor([1]), 1: torch.tensor([2])}
    with pytest.raises(UcpSpecError, match="not floating point"):
        spec.consolidate("bias", ints, topo)


def test_first_policy_reads_only_the_first_copy():
    spec = load_spec('param "w" replicate tp first')
    topo = Topology(tp=4, dp=2)
    layout = spec.layout("w", (3,), topo)
    assert layout.needed() == (0,)
    assert torch.equal(spec.consolidate("w", {0: torch.ones(3)}, topo), torch.ones(3))
    checked = load_spec('param "w" replicate tp').layout("w", (3,), topo)
    assert checked.needed() == (0, 1, 2, 3)  # dp copies are never read unless asked for


def test_consolidate_reports_missing_and_misshapen_fragments():
    spec = load_spec('param "w" split tp dim 0 stage first\nparam "s" split tp dim 0 stage last')
    topo = Topology(tp=2, pp=2)
    with pytest.raises(UcpSpecError, match="ranks \\[1\\] are missing"):
        spec.consolidate("w", {0: torch.zeros(2)}, topo, global_shape=(4,))
    with pytest.raises(UcpSpecError, match="has shape \\[3\\], the spec expects \\[2\\]"):
        spec.consolidate("w", {0: torch.zeros(2), 1: torch.zeros(3)}, topo, global_shape=(4,))
    with pytest.raises(UcpSpecError, match="rank 0 holds no fragment of 's'"):
        spec.consolidate("s", {0: torch.zeros(2), 2: torch.zeros(2), 3: torch.zeros(2)}, topo)
    with pytest.raises(UcpSpecError, match="does not hold 's'"):
        spec.cut("s", torch.zeros(4), topo, 0)


def test_global_shape_is_inferred_from_fragments():
    spec = load_spec('param "w" split tp dim 1 balanced\nparam "e" split tp dim 0 pad 5 to 8')
    topo = Topology(tp=3)
    shapes = {0: (2, 3), 1: (2, 2), 2: (2, 2)}
    assert spec.infer_shape("w", shapes, topo) == (2, 7)
    assert spec.infer_shape("e", {0: (3,), 1: (3,)}, Topology(tp=2)) == (5,)
    with pytest.raises(UcpSpecError, match="no fragment for shard"):
        spec.infer_shape("w", {0: (2, 3)}, topo)


# -- layout errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, shape, topo, words", [
    ('param "w" split tp dim 2', (4, 4), Topology(tp=2), "has no dim 2"),
    ('param "w" split tp dim 0 parts [3, 3]', (7,), Topology(), "sum to 6"),
    ('param "w" split tp dim 0 groups 2 [2, 1, 1]', (9,), Topology(), "2 groups of [2, 1, 1] make 8"),
    ('param "w" split tp dim 0 groups 3 [2, 1]', (9,), Topology(tp=2), "3 groups do not split"),
    ('param "w" split tp dim 0 pad 5 to 9', (5,), Topology(tp=2), "does not split over tp"),
    ('param "w" transpose [1, 0]', (3,), Topology(), "lists 2 dims"),
    ('param "w" stage 3', (3,), Topology(pp=2), "stage 3 does not exist"),
])
def test_layout_errors_name_the_rule_line(text, shape, topo, words):
    with pytest.raises(UclError) as info:
        load_spec("\n" + text).layout("w", shape, topo)
    assert words in info.value.message and info.value.line == 2 and info.value.context


def test_constants_can_be_overridden():
    text = "heads = 4\nkv = 2\nhd = 8 / heads\nparam \"w\" split tp dim 0 groups kv [heads / kv * hd, hd, hd]"
    spec = load_spec(text, constants={"heads": 8, "kv": 4})
    assert spec.constants == {"heads": 8, "kv": 4, "hd": 1}
    assert spec.layout("w", (16,), Topology(tp=4)).local_shape(0) == (4,)
    assert spec.with_constants({"kv": 8}).constants["kv"] == 8
    with pytest.raises(UclError, match="cannot override nope"):
        load_spec(text, constants={"nope": 1})


def test_one_layout_serves_every_state():
    from ucp.grammar._tensor import consolidate_tensors, cut_tensor

    spec = load_spec('param "qkv" split tp dim 0 groups 2 [2, 1, 1]\n')
    topo = Topology(tp=2, dp=2)
    layout = spec.layout("qkv", (8, 3), topo)
    states = {"param": torch.randn(8, 3).to(torch.bfloat16), "fp32": torch.randn(8, 3),
              "exp_avg": torch.randn(8, 3), "exp_avg_sq": torch.rand(8, 3, dtype=torch.float64)}
    for state, full in states.items():
        frags = {r: cut_tensor(layout, full, r) for r in layout.ranks()}
        assert torch.equal(frags[1], spec.cut("qkv", full, topo, 1)), state
        assert torch.equal(consolidate_tensors(layout, frags), full), state
