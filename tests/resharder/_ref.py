"""An independent reference for the resharder tests: how a small Llama in Megatron-core naming is
cut for any tp/pp (written out by hand, like Megatron does it, not through UCL), and the ZeRO
partitions of the cut tensors (concatenate, pad, split), so every resharded state can be compared
bit for bit with slicing the consolidated tensors directly."""

from __future__ import annotations

import math

import torch

C = dict(vocab=50, hidden=32, heads=8, kv_heads=4, ffn=24, num_layers=4, pad_multiple=4)
HEAD_DIM = C["hidden"] // C["heads"]
QPG = C["heads"] // C["kv_heads"]
LAYER = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.layer_norm_weight",
         "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
         "mlp.linear_fc1.layer_norm_weight", "mlp.linear_fc2.weight")
FROZEN = "decoder.final_layernorm.weight"
STATES = ("fp32", "exp_avg", "exp_avg_sq")
HYPER = [{"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
         {"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0}]


def names() -> list[str]:
    out = ["embedding.word_embeddings.weight"]
    out += [f"decoder.layers.{i}.{s}" for i in range(C["num_layers"]) for s in LAYER]
    return out + [FROZEN, "output_layer.weight"]


def shape(name: str) -> tuple[int, ...]:
    h, f, v = C["hidden"], C["ffn"], C["vocab"]
    if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
        return (v, h)
    if name.endswith("linear_qkv.weight"):
        return ((C["heads"] + 2 * C["kv_heads"]) * HEAD_DIM, h)
    if name.endswith("linear_proj.weight"):
        return (h, C["heads"] * HEAD_DIM)
    if name.endswith("linear_fc1.weight"):
        return (2 * f, h)
    if name.endswith("linear_fc2.weight"):
        return (h, f)
    return (h,)


def group(name: str) -> int | None:
    """Two param groups: matrices (weight decay) and norms (none); the final norm is frozen."""
    if name == FROZEN:
        return None
    return 1 if len(shape(name)) == 1 else 0


def full_state(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Consolidated states: bf16 weights, distinct fp32 masters, two Adam moments, a step."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names():
        master = torch.randn(shape(n), generator=g)
        st = {"param": (master + 1e-3 * torch.randn(shape(n), generator=g)).bfloat16()}
        if group(n) is not None:
            st.update(fp32=master, exp_avg=torch.randn(shape(n), generator=g),
                      exp_avg_sq=torch.rand(shape(n), generator=g), step=torch.tensor(7.0))
        out[n] = st
    return out


def tp_cut(name: str, t: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    """What Megatron-core holds of ``name`` on tensor-parallel rank ``r`` of ``tp``."""
    if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
        padded = -(-C["vocab"] // (tp * C["pad_multiple"])) * tp * C["pad_multiple"]
        full = torch.cat([t, torch.zeros(padded - t.shape[0], t.shape[1], dtype=t.dtype)])
        return full.chunk(tp)[r].clone()
    if name.endswith("linear_qkv.weight"):
        q, k, v = t.split([C["heads"] * HEAD_DIM, C["kv_heads"] * HEAD_DIM, C["kv_heads"] * HEAD_DIM])
        groups = [torch.cat([q[i * QPG * HEAD_DIM:(i + 1) * QPG * HEAD_DIM],
                             k[i * HEAD_DIM:(i + 1) * HEAD_DIM], v[i * HEAD_DIM:(i + 1) * HEAD_DIM]])
                  for i in range(C["kv_heads"])]
        per = C["kv_heads"] // tp
        return torch.cat(groups[r * per:(r + 1) * per])
    if name.endswith("linear_fc1.weight"):
        gate, up = t.chunk(2)
        return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return t.chunk(tp, dim=1)[r].clone()
    return t.clone()


def stage_params(pp: int, stages: int) -> list[tuple[str, str]]:
    """(canonical name, stage-local name) of what pipeline stage ``pp`` of ``stages`` holds."""
    per = C["num_layers"] // stages
    out = []
    for n in names():
        if n.startswith("decoder.layers."):
            layer = int(n.split(".")[2])
            if layer // per == pp:
                out.append((n, n.replace(f"layers.{layer}.", f"layers.{layer - pp * per}.", 1)))
        elif n.startswith("embedding.") and pp == 0 or not n.startswith(("embedding.", "decoder.layers.")) \
                and pp == stages - 1:
            out.append((n, n))
    return out


def zero_flat(tensors: list[torch.Tensor], dp: int, r: int, alignment: int) -> torch.Tensor:
    """ZeRO-1/2: the tensors flattened end to end, padded to alignment * dp, split over dp."""
    flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)
    padded = -(-flat.numel() // (alignment * dp)) * alignment * dp
    return torch.cat([flat, flat.new_zeros(padded - flat.numel())]).chunk(dp)[r] if padded else flat


def zero3(t: torch.Tensor, dp: int, r: int, alignment: int) -> torch.Tensor:
    """ZeRO-3: one tensor flattened, padded to dp partitions of ceil(n / dp) rounded up."""
    n = t.numel()
    part = -(-math.ceil(n / dp) // alignment) * alignment
    flat = torch.cat([t.reshape(-1), t.new_zeros(part * dp - n)])
    return flat[r * part:(r + 1) * part]


def reference_rank(topo, rank: int, alignment: int) -> dict:
    """What target ``rank`` must hold, from the consolidated tensors and the reference cuts."""
    full, c = full_state(), topo.coords(rank)
    cut = lambda n, s: tp_cut(n, full[n][s], topo.tp, c["tp"])  # noqa: E731
    held = stage_params(c["pp"], topo.pp)
    model, state = {}, {}
    for canon, local in held:
        model[local] = cut(canon, "param")
        if topo.zero == 3:
            model[local] = zero3(model[local], topo.dp, c["dp"], alignment)
        if group(canon) is None:
            continue
        state[local] = {"step": full[canon]["step"]}
        if topo.zero in (0, 3):
            for s in STATES:
                state[local][s] = cut(canon, s) if topo.zero == 0 else \
                    zero3(cut(canon, s), topo.dp, c["dp"], alignment)
    groups = [{**h, "betas": list(h["betas"]), "params": [loc for n, loc in held if group(n) == g]}
              for g, h in enumerate(HYPER)]
    optim = {"state": state, "param_groups": groups}
    if topo.zero in (1, 2):
        optim["flat"] = [{s: zero_flat([cut(n, s) for n, _ in held if group(n) == g],
                                           topo.dp, c["dp"], alignment) for s in STATES}
                         for g in range(len(HYPER))]
    return {"model": model, "optim": optim, "step": 7}


def assert_same(got, want, where="state"):
    """Equal structure; tensors equal bit for bit (same dtype, shape and bytes)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == want.dtype and got.shape == want.shape, \
            f"{where}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def save_megatron_rank(rank: int, world: int, url: str) -> bool:
    """One rank of a tp=2 x pp=2 Megatron job (run by ``run_ranks``): its cut of every state,
    under stage-local names, saved with ``ucp.save``."""
    import ucp

    topo = ucp.Topology(tp=2, pp=2)
    c = topo.coords(rank)
    full = full_state()
    model, state, groups = {}, {}, [{**h, "params": []} for h in HYPER]
    for canon, local in stage_params(c["pp"], 2):
        model[local] = tp_cut(canon, full[canon]["param"], 2, c["tp"])
        if group(canon) is not None:
            state[local] = {s: tp_cut(canon, full[canon][s], 2, c["tp"]) for s in STATES}
            state[local]["step"] = full[canon]["step"]
            groups[group(canon)]["params"].append(local)
    ucp.save({"model": model, "optim": {"state": state, "param_groups": groups}}, url, step=7,
             topology=str(topo)).wait()
    return True
