"""Train the tiny GPT on CPU ranks with real torch parallelism, checkpointing through ucp.

    torchrun --nproc_per_node 4 examples/train.py --tp 2 --ckpt /tmp/run --steps 20 --save-every 10
    torchrun --nproc_per_node 3 examples/train.py --tp 1 --ckpt /tmp/run --steps 20   # resumes at 10

Layouts: ``--tp N`` (DTensor tensor parallel, data parallel over the other ranks), ``--zero fsdp``
(FSDP2), ``--zero zero1`` (ZeroRedundancyOptimizer). The global batch is fixed, so any topology
sees the same samples: a resumed run continues the same loss curve.
"""

import argparse
import json
import logging
import os
import signal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import gpt
import ucp


def parallelize(model, mesh, args):
    if args.tp > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {f"layers.{i}.{m}": ColwiseParallel() for i in model.layers for m in ("q", "k", "v", "up")}
        plan.update({f"layers.{i}.{m}": RowwiseParallel() for i in model.layers for m in ("proj", "down")})
        parallelize_module(model, mesh["tp"], plan)
    if args.zero == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    if args.zero == "zero1":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=args.lr, weight_decay=0.1)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)


def average_gradients(model, mesh, args):
    if args.zero == "fsdp" or mesh["dp"].size() == 1:
        return  # FSDP2 reduce-scatters (and averages) gradients itself
    for p in model.parameters():
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        dist.all_reduce(grad, group=mesh["dp"].get_group())
        grad /= mesh["dp"].size()


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--zero", choices=("none", "fsdp", "zero1"), default="none")
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss-log", help="append {step, loss} JSON lines here (rank 0)")
    p.add_argument("--stop-at", type=int, help="end the job after this step (the schedule still spans --steps)")
    p.add_argument("--crash-at", type=int, help="SIGKILL the last rank at this step (fault drill)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    dp = world // args.tp
    mesh = init_device_mesh("cpu", (dp, args.tp), mesh_dim_names=("dp", "tp"))
    zero = {"none": 0, "zero1": 1, "fsdp": 3}[args.zero]
    model = gpt.build(seed=0)
    opt = parallelize(model, mesh, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: gpt.lr_at(s, args.steps) / args.lr)
    state = {"model": model, "optim": opt, "sched": sched, "data": {"samples": 0}}

    ckpt = ucp.Checkpointer(args.ckpt, every=args.save_every, keep=2,
                            topology=ucp.Topology(dp=dp, tp=args.tp, zero=zero))
    start = ckpt.resume(state)  # 0 on a fresh run; otherwise the step to continue from
    per_rank = args.global_batch // dp
    for step in range(start + 1, args.steps + 1):
        if args.crash_at == step and rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = gpt.batch(step, mesh["dp"].get_local_rank() * per_rank, per_rank)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        average_gradients(model, mesh, args)
        opt.step()
        sched.step()
        opt.zero_grad()
        state["data"]["samples"] += args.global_batch
        dist.all_reduce(loss := loss.detach(), group=mesh["dp"].get_group())
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item() / dp:.6f}", flush=True)
            if args.loss_log:
                with open(args.loss_log, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item() / dp, "world": world}) + "\n")
        ckpt.maybe_save(step, state)
        if step == args.stop_at:
            break
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
