"""A stock torch job (no ucp import): transformers' Llama on a 2-D (dp x tp) mesh loads a DCP checkpoint.

Run under torchrun, one process per rank (CPU, gloo)::

    python -m torch.distributed.run --nproc_per_node 4 ... tests/resharder/_dcp_hf_tp_job.py \
        HF_FOLDER DCP_DIR SEEN.pt --tp 2

Builds ``transformers.LlamaForCausalLM`` from the folder's ``config.json`` with fresh random weights,
applies torch's ``parallelize_module`` over the ``tp`` mesh dimension (ColwiseParallel q/k/v/gate/up,
RowwiseParallel o/down) and ``fully_shard`` (FSDP2) over ``dp`` (each decoder layer, then the model),
loads ``DCP_DIR`` with ``dcp.load`` into ``get_model_state_dict`` and puts it back with
``set_model_state_dict``. Every rank records, to ``SEEN.pt.R``: each parameter's full tensor
(``full_tensor``), its local shard's shape, the logits of a fixed batch; then the ranks train one step
with a new AdamW (the loss goes in the record).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

assert "ucp" not in sys.modules


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("hf")
    p.add_argument("load")
    p.add_argument("record")
    p.add_argument("--tp", type=int, default=2)
    own = p.parse_args(argv)
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import LlamaConfig, LlamaForCausalLM

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world // own.tp, own.tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(123)  # not the pretrained weights: they must come from the files
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(own.hf))
    for layer in model.model.layers:
        plan = {f"self_attn.{n}_proj": ColwiseParallel() for n in "qkv"}
        plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                     "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
        parallelize_module(layer, mesh["tp"], plan)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=own.load)
    set_model_state_dict(model, state["model"])
    seen = {"full": {}, "local_shape": {}}
    for name, prm in model.named_parameters():
        seen["full"][name] = prm.full_tensor().detach().clone() if isinstance(prm, DTensor) else prm.detach().clone()
        seen["local_shape"][name] = tuple(prm.to_local().shape) if isinstance(prm, DTensor) else tuple(prm.shape)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    model.eval()
    with torch.no_grad():
        seen["logits"] = model(tokens).logits.clone()
    seen["tokens"] = tokens
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dp_rank = mesh["dp"].get_local_rank()  # the ranks of one tp group see the same batch
    batch = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(dp_rank))
    loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
    loss.backward()
    opt.step()
    seen["loss"] = loss.item()
    torch.save(seen, f"{own.record}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
