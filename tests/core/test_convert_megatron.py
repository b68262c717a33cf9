"""A hand-sharded Megatron-style save (TP=2 x PP=2, plain tensors) converts with the bundled
Llama spec. The shards are cut here by an independent Megatron-core reference, not by ucp."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.grammar import bundled_spec

C = dict(vocab=50, hidden=16, heads=4, kv_heads=2, ffn=24, num_layers=4, pad_multiple=4)
TP, PP = 2, 2
HEAD_DIM = C["hidden"] // C["heads"]
QPG = C["heads"] // C["kv_heads"]


def full_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, f, v = C["hidden"], C["ffn"], C["vocab"]
    qkv_rows = (C["heads"] + 2 * C["kv_heads"]) * HEAD_DIM
    out = {"embedding.word_embeddings.weight": torch.randn(v, h, generator=g),
           "decoder.final_layernorm.weight": torch.randn(h, generator=g),
           "output_layer.weight": torch.randn(v, h, generator=g)}
    for i in range(C["num_layers"]):
        p = f"decoder.layers.{i}"
        out.update({f"{p}.self_attention.linear_qkv.weight": torch.randn(qkv_rows, h, generator=g),
                    f"{p}.self_attention.linear_qkv.layer_norm_weight": torch.randn(h, generator=g),
                    f"{p}.self_attention.linear_proj.weight": torch.randn(h, C["heads"] * HEAD_DIM, generator=g),
                    f"{p}.mlp.linear_fc1.weight": torch.randn(2 * f, h, generator=g),
                    f"{p}.mlp.linear_fc1.layer_norm_weight": torch.randn(h, generator=g),
                    f"{p}.mlp.linear_fc2.weight": torch.randn(h, f, generator=g)})
    return out


def megatron_shard(name: str, t: torch.Tensor, tp: int) -> torch.Tensor:
    """What Megatron-core stores for ``name`` on tensor-parallel rank ``tp``."""
    if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
        padded = -(-C["vocab"] // (TP * C["pad_multiple"])) * TP * C["pad_multiple"]
        full = torch.cat([t, torch.zeros(padded - t.shape[0], t.shape[1], dtype=t.dtype)])
        return full.chunk(TP)[tp]
    if name.endswith("linear_qkv.weight"):
        q, k, v = t.split([C["heads"] * HEAD_DIM, C["kv_heads"] * HEAD_DIM, C["kv_heads"] * HEAD_DIM])
        groups = []
        for grp in range(C["kv_heads"]):
            groups.append(torch.cat([q[grp * QPG * HEAD_DIM:(grp + 1) * QPG * HEAD_DIM],
                                     k[grp * HEAD_DIM:(grp + 1) * HEAD_DIM], v[grp * HEAD_DIM:(grp + 1) * HEAD_DIM]]))
        per = C["kv_heads"] // TP
        return torch.cat(groups[tp * per:(tp + 1) * per])
    if name.endswith("linear_fc1.weight"):
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(TP)[tp], up.chunk(TP)[tp]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return t.chunk(TP, dim=1)[tp]
    return t.clone()


def local_params(pp: int) -> list[tuple[str, str]]:
    """(global name, stage-local name) of what pipeline stage ``pp`` holds."""
    per = C["num_layers"] // PP
    out = [("embedding.word_embeddings.weight",) * 2] if pp == 0 else []
    for j in range(per):
        for suffix in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
                       "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
                       "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc2.weight"):
            out.append((f"decoder.layers.{pp * per + j}.{suffix}", f"decoder.layers.{j}.{suffix}"))
    if pp == PP - 1:
        out += [("decoder.final_layernorm.weight",) * 2, ("output_layer.weight",) * 2]
    return out


def save_megatron_rank(rank, world, url):
    topo = ucp.Topology(tp=TP, pp=PP)
    c = topo.coords(rank)
    weights, moments = full_model(0), full_model(1)
    model, state = {}, {}
    for glob, local in local_params(c["pp"]):
        model[local] = megatron_shard(glob, weights[glob], c["tp"]).bfloat16()
        state[local] = {"exp_avg": megatron_shard(glob, moments[glob], c["tp"]), "step": torch.tensor(5.0)}
    groups = [{"params": list(model), "lr": 1e-4, "betas": (0.9, 0.95)}]
    ucp.save({"model": model, "optim": {"state": state, "param_groups": groups}}, url, step=5,
             topology=str(topo)).wait()
    return True


@pytest.mark.parametrize("workers", [1, 2])
def test_megatron_shards_convert_with_bundled_llama_spec(run_ranks, tmp_path, workers):
    src = str(tmp_path / "megatron")
    run_ranks(save_megatron_rank, TP * PP, args=(src,))
    spec = bundled_spec("llama_megatron", constants={k: v for k, v in C.items()})
    ckpt = ucp.convert(src, str(tmp_path / "universal"), spec=spec, workers=workers)
    weights, moments = full_model(0), full_model(1)
    assert sorted(ckpt.names()) == sorted(weights)
    for name, w in weights.items():
        info = ckpt.info(name)
        assert info.shape == tuple(w.shape) and info.dtype == torch.bfloat16, name
        assert torch.equal(ckpt.read(name, "param"), w.bfloat16()), name
        assert torch.equal(ckpt.read(name, "exp_avg"), moments[name]), name
        assert float(ckpt.read(name, "step")) == 5.0
    meta = ckpt.metadata
    assert meta["spec_constants"]["vocab"] == 50 and "linear_qkv" in meta["spec"]
    assert ckpt.param_groups == [{"lr": 1e-4, "betas": [0.9, 0.95]}]


def test_without_spec_the_shards_are_refused(run_ranks, tmp_path):
    src = str(tmp_path / "megatron")
    run_ranks(save_megatron_rank, TP * PP, args=(src,))
    with pytest.raises(ucp.ConvertError, match="--spec"):
        ucp.convert(src, str(tmp_path / "u"))


def test_a_spec_that_does_not_fit_names_the_parameter(run_ranks, tmp_path):
    src = str(tmp_path / "megatron")
    run_ranks(save_megatron_rank, TP * PP, args=(src,))
    wrong = bundled_spec("llama_megatron", constants={**C, "ffn": 20})
    with pytest.raises(ucp.UcpError, match="linear_fc1"):
        ucp.convert(src, str(tmp_path / "u"), spec=wrong)
