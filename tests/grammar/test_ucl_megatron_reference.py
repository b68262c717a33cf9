"""The bundled Llama spec against an independent, hand-written Megatron-core style cut.

The reference below slices each canonical tensor the way Megatron-core lays out a tensor-parallel
rank's state dict: linear_qkv as [q heads of the group, k, v] for each of the rank's KV groups,
linear_fc1 as [gate shard; up shard], row-parallel weights by input columns, the vocabulary padded
to a multiple of tp x make-vocab-size-divisible-by, and layers renumbered per pipeline stage.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucp import Topology
from ucp.grammar import bundled_spec


def _canonical(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv, ffn = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["ffn"]
    hd = hidden // heads
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(torch.bfloat16)  # noqa: E731
    model = {"embedding.word_embeddings.weight": rnd(cfg["vocab"], hidden),
             "decoder.final_layernorm.weight": rnd(hidden),
             "output_layer.weight": rnd(cfg["vocab"], hidden)}
    parts = {}
    for i in range(cfg["num_layers"]):
        q, k, v = rnd(heads * hd, hidden), rnd(kv * hd, hidden), rnd(kv * hd, hidden)
        gate, up = rnd(ffn, hidden), rnd(ffn, hidden)
        parts[i] = (q, k, v, gate, up)
        p = f"decoder.layers.{i}."
        model[p + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v])
        model[p + "self_attention.linear_qkv.layer_norm_weight"] = rnd(hidden)
        model[p + "self_attention.linear_proj.weight"] = rnd(hidden, heads * hd)
        model[p + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        model[p + "mlp.linear_fc1.layer_norm_weight"] = rnd(hidden)
        model[p + "mlp.linear_fc2.weight"] = rnd(hidden, ffn)
    return model, parts


def _padded_vocab(vocab, tp, multiple):
    step = tp * multiple
    return (vocab + step - 1) // step * step


def _megatron_rank(cfg, model, parts, tp, pp, tp_rank, pp_rank):
    """What Megatron-core's rank (tp_rank, pp_rank) holds, by local name."""
    heads, kv = cfg["heads"], cfg["kv_heads"]
    hd, per_group = cfg["hidden"] // heads, heads // kv
    out = {}
    padded = _padded_vocab(cfg["vocab"], tp, cfg["pad_multiple"])

    def vocab_shard(w):
        full = torch.zeros(padded, w.shape[1], dtype=w.dtype)
        full[: w.shape[0]] = w
        return full.chunk(tp)[tp_rank]

    if pp_rank == 0:
        out["embedding.word_embeddings.weight"] = vocab_shard(model["embedding.word_embeddings.weight"])
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = model["decoder.final_layernorm.weight"]
        out["output_layer.weight"] = vocab_shard(model["output_layer.weight"])
    per_stage = cfg["num_layers"] // pp
    for local in range(per_stage):
        i = pp_rank * per_stage + local
        q, k, v, gate, up = parts[i]
        rows = []
        groups_here = kv // tp
        for j in range(groups_here):
            g = tp_rank * groups_here + j
            rows += [q[g * per_group * hd:(g + 1) * per_group * hd], k[g * hd:(g + 1) * hd],
                     v[g * hd:(g + 1) * hd]]
        src, dst = f"decoder.layers.{i}.", f"decoder.layers.{local}."
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat(rows)
        out[dst + "self_attention.linear_qkv.layer_norm_weight"] = model[src + "self_attention.linear_qkv.layer_norm_weight"]
        out[dst + "self_attention.linear_proj.weight"] = model[src + "self_attention.linear_proj.weight"].chunk(tp, dim=1)[tp_rank]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
        out[dst + "mlp.linear_fc1.layer_norm_weight"] = model[src + "mlp.linear_fc1.layer_norm_weight"]
        out[dst + "mlp.linear_fc2.weight"] = model[src + "mlp.linear_fc2.weight"].chunk(tp, dim=1)[tp_rank]
    return out


@st.composite
def configs(draw):
    kv = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv * draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 3))
    tp = draw(st.sampled_from([t for t in (1, 2, 4, 8) if kv % t == 0]))
    pp = draw(st.integers(1, 4))
    cfg = {"hidden": heads * head_dim, "heads": heads, "kv_heads": kv,
           "ffn": tp * draw(st.integers(1, 3)), "num_layers": pp * draw(st.integers(1, 2)),
           "vocab": draw(st.integers(1, 40)), "pad_multiple": draw(st.integers(1, 4))}
    return cfg, tp, pp


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.integers(0, 2**31 - 1))
def test_llama_spec_cuts_like_megatron_core(config, seed):
    cfg, tp, pp = config
    spec = bundled_spec("llama_megatron", constants=cfg)
    topo = Topology(tp=tp, pp=pp)
    model, parts = _canonical(cfg, seed)
    assert spec.check({n: tuple(t.shape) for n, t in model.items()}, topology=topo) == []
    by_rank: dict[int, dict[str, torch.Tensor]] = {r: {} for r in range(topo.world_size)}
    for name, tensor in model.items():
        for rank, local in spec.holders(name, topo).items():
            by_rank[rank][local] = spec.cut(name, tensor, topo, rank)
    for rank in range(topo.world_size):
        coords = topo.coords(rank)
        expected = _megatron_rank(cfg, model, parts, tp, pp, coords["tp"], coords["pp"])
        assert sorted(by_rank[rank]) == sorted(expected)
        for local, tensor in expected.items():
            assert torch.equal(by_rank[rank][local], tensor), (rank, local)
            assert spec.canonical_name(local, topo, rank) in model


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.integers(0, 2**31 - 1))
def test_megatron_fragments_consolidate_to_canonical(config, seed):
    cfg, tp, pp = config
    spec = bundled_spec("llama_megatron", constants=cfg)
    topo = Topology(tp=tp, pp=pp)
    model, parts = _canonical(cfg, seed)
    held = {}
    for rank in range(topo.world_size):
        coords = topo.coords(rank)
        for local, t in _megatron_rank(cfg, model, parts, tp, pp, coords["tp"], coords["pp"]).items():
            held.setdefault(spec.canonical_name(local, topo, rank), {})[rank] = t
    assert sorted(held) == sorted(model)
    for name, fragments in held.items():
        assert torch.equal(spec.consolidate(name, fragments, topo), model[name]), name
