"""Functions run on the ranks of a gloo group (``ucp.testing.run_ranks`` imports this file by
path, so it imports its neighbours by path too)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import ucp


def save_ranks(rank, world, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    w = torch.arange(24.0).reshape(6, 4)
    model = {"w": distribute_tensor(w, mesh, [Shard(0)]),
             "b": distribute_tensor(torch.arange(4.0), mesh, [Replicate()])}
    optim = {"state": {"w": {"exp_avg": distribute_tensor(w * 2, mesh, [Shard(1)])}}}
    ucp.save({"model": model, "optim": optim}, f"{root}/dtensor", step=1, topology="tp=2").wait()

    sys.path.insert(0, str(Path(__file__).parent))
    from _sample import HIDDEN, gpt2_state, small_gpt2_spec

    text = small_gpt2_spec()
    spec = ucp.load_spec(text)
    topo = ucp.Topology.parse("tp=2")
    local = {n: spec.cut(n, t, topo, rank) for n, t in gpt2_state().items() if n != "lm_head.weight"}
    ucp.save({"model": local}, f"{root}/megatron", step=1, topology=str(topo), spec=text).wait()
    ucp.save({"model": local}, f"{root}/nospec", step=1, topology=str(topo)).wait()
    if rank == 1:
        del local["transformer.h.0.mlp.c_fc.weight"]
    ucp.save({"model": local}, f"{root}/missing", step=1, topology=str(topo), spec=text).wait()
    if rank == 1:
        local["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(HIDDEN, 2 * HIDDEN + 1)
    ucp.save({"model": local}, f"{root}/badshape", step=1, topology=str(topo), spec=text).wait()
    return True


def fingerprint_ranks(rank, world, root):
    """test_fingerprint_native: a bf16 weight cut by rows, its moment by columns, a replicated bias."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(10, 6, generator=g).bfloat16(), torch.randn(6, generator=g)
    model = {"w": distribute_tensor(w, mesh, [Shard(0)]), "b": distribute_tensor(b, mesh, [Replicate()])}
    optim = {"state": {"w": {"exp_avg": distribute_tensor(w.float() * 3, mesh, [Shard(1)])}}}
    ucp.save({"model": model, "optim": optim}, f"{root}/dtensor", step=1, topology="tp=2").wait()
    return True
