"""The bundled specs fit the models they describe, and round-trip on awkward topologies."""

from __future__ import annotations

import pytest
import torch

from ucp import Topology, UcpSpecError
from ucp.grammar import bundled_spec, bundled_spec_names, bundled_spec_text, load_spec


def gpt2_params(hidden=768, layers=12, vocab=50257, positions=1024, lm_head=False, mask=False):
    p = {"transformer.wte.weight": (vocab, hidden), "transformer.wpe.weight": (positions, hidden),
         "transformer.ln_f.weight": (hidden,), "transformer.ln_f.bias": (hidden,)}
    for i in range(layers):
        h = f"transformer.h.{i}."
        p.update({h + "ln_1.weight": (hidden,), h + "ln_1.bias": (hidden,),
                  h + "ln_2.weight": (hidden,), h + "ln_2.bias": (hidden,),
                  h + "attn.c_attn.weight": (hidden, 3 * hidden), h + "attn.c_attn.bias": (3 * hidden,),
                  h + "attn.c_proj.weight": (hidden, hidden), h + "attn.c_proj.bias": (hidden,),
                  h + "mlp.c_fc.weight": (hidden, 4 * hidden), h + "mlp.c_fc.bias": (4 * hidden,),
                  h + "mlp.c_proj.weight": (4 * hidden, hidden), h + "mlp.c_proj.bias": (hidden,)})
        if mask:
            p[h + "attn.bias"] = (1, 1, positions, positions)
    if lm_head:
        p["lm_head.weight"] = (vocab, hidden)
    return p


def mixtral_params(hidden=4096, layers=32, vocab=32000, heads=32, kv=8, ffn=14336, experts=8):
    hd = hidden // heads
    p = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
         "model.norm.weight": (hidden,)}
    for i in range(layers):
        m = f"model.layers.{i}."
        p.update({m + "input_layernorm.weight": (hidden,),
                  m + "post_attention_layernorm.weight": (hidden,),
                  m + "self_attn.q_proj.weight": (heads * hd, hidden),
                  m + "self_attn.k_proj.weight": (kv * hd, hidden),
                  m + "self_attn.v_proj.weight": (kv * hd, hidden),
                  m + "self_attn.o_proj.weight": (hidden, heads * hd),
                  m + "block_sparse_moe.gate.weight": (experts, hidden)})
        for e in range(experts):
            x = m + f"block_sparse_moe.experts.{e}."
            p.update({x + "w1.weight": (ffn, hidden), x + "w3.weight": (ffn, hidden),
                      x + "w2.weight": (hidden, ffn)})
    return p


def test_bundled_names():
    assert bundled_spec_names() == ("gpt2", "llama_hf", "llama_megatron", "mixtral_moe")
    with pytest.raises(UcpSpecError, match="no bundled spec named 'bert'.*gpt2"):
        bundled_spec("bert")


@pytest.mark.parametrize("topo", [Topology(), Topology(tp=4, pp=3), Topology(tp=8, pp=4, dp=2)])
@pytest.mark.parametrize("extras", [{}, {"lm_head": True, "mask": True}])
def test_gpt2_fits_hugging_face_names(topo, extras):
    assert bundled_spec("gpt2").check(gpt2_params(**extras), topology=topo) == []


def test_gpt2_reports_what_does_not_fit():
    params = gpt2_params()
    del params["transformer.wpe.weight"]
    params["transformer.h.0.attn.c_attn.weight"] = (768, 2000)
    params["score.weight"] = (2, 768)
    problems = bundled_spec("gpt2").check(params)
    kinds = sorted((p.kind, p.param) for p in problems)
    assert kinds == [("shape", "transformer.h.0.attn.c_attn.weight"), ("uncovered", "score.weight"),
                     ("unmatched", None)]
    assert any("2304" in p.message for p in problems if p.kind == "shape")


def test_gpt2_medium_by_overriding_constants():
    spec = bundled_spec("gpt2", constants={"hidden": 1024, "num_layers": 24})
    assert spec.check(gpt2_params(hidden=1024, layers=24), topology=Topology(tp=2, pp=4)) == []
    small = bundled_spec("gpt2")
    problems = small.check(gpt2_params(layers=24))
    assert [(p.kind, p.line) for p in problems] == [("index", small.indices["layer"].pos.line)]
    assert "declares 12 values (0..11), but the parameters use 0..23" in problems[0].message


def test_gpt2_tied_embedding_on_first_and_last_stage():
    spec = bundled_spec("gpt2", constants={"hidden": 4, "num_layers": 4, "vocab": 11,
                                           "pad_multiple": 2, "positions": 8})
    topo = Topology(tp=2, pp=2)
    holders = spec.holders("transformer.wte.weight", topo)
    assert sorted(holders) == [0, 1, 2, 3]
    emb = torch.randn(11, 4)
    frags = {r: spec.cut("transformer.wte.weight", emb, topo, r) for r in holders}
    assert all(f.shape == (6, 4) for f in frags.values())  # 11 -> 12 rows, 6 per tp rank
    assert torch.equal(spec.consolidate("transformer.wte.weight", frags, topo), emb)
    qkv = torch.arange(4 * 12).reshape(4, 12)
    local = spec.cut("transformer.h.3.attn.c_attn.weight", qkv, topo, topo.rank(tp=1, pp=1))
    assert torch.equal(local, torch.cat([qkv[:, 2:4], qkv[:, 6:8], qkv[:, 10:12]], dim=1))
    assert spec.local_name("transformer.h.3.attn.c_attn.weight", topo, 3) == "transformer.h.1.attn.c_attn.weight"


def llama_hf_params(hidden=64, layers=2, vocab=80, heads=8, kv=4, ffn=96, bias=False):
    """transformers' LlamaForCausalLM names (attention biases for ``bias``, as Qwen2 has)."""
    hd = hidden // heads
    p = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
         "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        m = f"model.layers.{i}."
        p.update({m + "input_layernorm.weight": (hidden,), m + "post_attention_layernorm.weight": (hidden,),
                  m + "self_attn.q_proj.weight": (heads * hd, hidden), m + "self_attn.k_proj.weight": (kv * hd, hidden),
                  m + "self_attn.v_proj.weight": (kv * hd, hidden), m + "self_attn.o_proj.weight": (hidden, heads * hd),
                  m + "mlp.gate_proj.weight": (ffn, hidden), m + "mlp.up_proj.weight": (ffn, hidden),
                  m + "mlp.down_proj.weight": (hidden, ffn)})
        if bias:
            p.update({m + f"self_attn.{x}_proj.bias": (n,) for x, n in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd))})
    return p


@pytest.mark.parametrize("bias", [False, True])
def test_llama_hf_cuts_as_torch_tensor_parallel_plans_do(bias):
    """Column-parallel projections split their rows (and biases), row-parallel ones their input
    dim; everything else is whole on every tp rank."""
    spec = bundled_spec("llama_hf")
    params = llama_hf_params(bias=bias)
    assert spec.check(params, topology=Topology(tp=4)) == []
    def tp_dim(name):
        return next((op.dim for op in spec.rule_for(name).splits if "tp" in op.axes), None)
    m = "model.layers.1."
    assert [tp_dim(m + f"{b}_proj.weight") for b in ("self_attn.q", "self_attn.k", "mlp.up")] == [0, 0, 0]
    assert [tp_dim(m + f"{b}_proj.weight") for b in ("self_attn.o", "mlp.down")] == [1, 1]
    assert [tp_dim(n) for n in ("model.embed_tokens.weight", "lm_head.weight", m + "input_layernorm.weight")] \
        == [None, None, None]
    if bias:
        assert tp_dim(m + "self_attn.k_proj.bias") == 0
    problems = spec.check(params, topology=Topology(tp=3))  # 64 rows do not split in 3
    assert problems and all(p.kind == "shape" for p in problems)


@pytest.mark.parametrize("topo", [Topology(), Topology(tp=2, ep=4, pp=4), Topology(tp=4, ep=8)])
def test_mixtral_fits_and_spreads_experts(topo):
    spec = bundled_spec("mixtral_moe")
    assert spec.check(mixtral_params(), topology=topo) == []
    name = "model.layers.5.block_sparse_moe.experts.7.w2.weight"
    holders = spec.holders(name, topo)
    assert len(holders) == topo.tp * topo.dp
    assert {topo.coords(r)["ep"] for r in holders} == {7 // (8 // topo.ep)}
    assert set(holders.values()) == {name.replace("experts.7", f"experts.{7 % (8 // topo.ep)}")
                                     .replace("layers.5", f"layers.{5 % (32 // topo.pp)}")}


def test_mixtral_uneven_tp_keeps_whole_kv_groups():
    spec = bundled_spec("mixtral_moe")
    topo = Topology(tp=3)
    q = spec.layout("model.layers.0.self_attn.q_proj.weight", (4096, 4096), topo)
    k = spec.layout("model.layers.0.self_attn.k_proj.weight", (1024, 4096), topo)
    # 8 KV groups over 3 ranks: 3, 3, 2 groups; q moves 4 heads of 128 rows per group
    assert [q.local_shape(r)[0] for r in range(3)] == [1536, 1536, 1024]
    assert [k.local_shape(r)[0] for r in range(3)] == [384, 384, 256]


def test_mixtral_round_trip_small():
    cfg = {"hidden": 8, "heads": 4, "kv_heads": 2, "ffn": 6, "num_layers": 2, "num_experts": 4,
           "vocab": 13, "pad_multiple": 1}
    spec = bundled_spec("mixtral_moe", constants=cfg)
    params = mixtral_params(hidden=8, layers=2, vocab=13, heads=4, kv=2, ffn=6, experts=4)
    topo = Topology(tp=3, ep=2, pp=2)
    assert spec.check(params, topology=topo) == []
    g = torch.Generator().manual_seed(0)
    for name, shape in params.items():
        full = torch.randn(shape, generator=g).to(torch.bfloat16)
        frags = {r: spec.cut(name, full, topo, r) for r in spec.holders(name, topo)}
        assert torch.equal(spec.consolidate(name, frags, topo), full), name


def test_bundled_text_is_loadable_as_a_file(tmp_path):
    path = tmp_path / "llama.ucl"
    path.write_text(bundled_spec_text("llama_megatron"))
    spec = load_spec(path, constants={"kv_heads": 4})
    assert spec.source == str(path) and spec.constants["q_per_group"] == 8


def test_load_spec_resolves_a_bundled_name_a_file_or_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_name = load_spec("llama_megatron", constants={"kv_heads": 4})
    assert by_name.source == "llama_megatron.ucl"
    assert by_name.text == bundled_spec_text("llama_megatron")
    assert by_name.constants["q_per_group"] == 8
    path = tmp_path / "mine.ucl"
    path.write_text('param "w" split tp dim 1\n')
    assert load_spec(str(path)).source == str(path)
    assert load_spec('param "w" split tp dim 1').source == "<string>"
    assert load_spec("default").default is not None  # a lone keyword is a whole spec
    assert load_spec(by_name) is by_name


@pytest.mark.parametrize("word", ["gtp2", "llama", "specs/mine.ucl", "Llama_Megatron"])
def test_a_word_that_is_neither_a_bundled_name_nor_a_file_lists_the_bundled_specs(
        word, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UcpSpecError) as e:
        load_spec(word)
    assert e.value.message == (f"no bundled spec or file named {word!r}; bundled: gpt2, "
                               "llama_hf, llama_megatron, mixtral_moe")
