"""Train the tiny GPT with pipeline parallelism (torch.distributed.pipelining), checkpointing through ucp.

    torchrun --nproc_per_node 4 examples/train_pipeline.py --pp 2 --ckpt /tmp/run --steps 20   # pp2 x dp2
    torchrun --nproc_per_node 2 examples/train_pipeline.py --pp 1 --ckpt /tmp/run --steps 20   # resumes at 10

``--pp 2``: each stage is the full GPT (seeded like every other example) with the modules it does
not own deleted, so its parameter names stay global (stage 0: ``wte``, ``wpe``, ``layers.0``;
stage 1: ``layers.1``, ``ln_f``, ``head``) and a checkpoint resumes on any other layout. A GPipe
schedule runs ``--microbatches`` microbatches per step; data parallel over the remaining ranks,
gradients averaged over the dp group. ``--pp 1``: the plain loop of train.py. The global batch is
fixed, so every layout sees the same samples: a resumed run continues the same loss curve.
"""

import argparse
import json
import logging
import os
import signal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import gpt
import ucp


class StageGPT(gpt.GPT):
    """A GPT that may lack its first modules (input: hidden states) or its last (output: hidden states)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "wte"):
            x = self.wte(x) + self.wpe(torch.arange(x.shape[1]))
        for block in self.layers.values():
            x = block(x)
        return self.head(self.ln_f(x)) if hasattr(self, "head") else x


def build_stage(stage: int, pp: int) -> nn.Module:
    """The full GPT (gpt.build's seed), less the modules pipeline stage ``stage`` of ``pp`` does not own."""
    model = gpt.build(seed=0)
    model.__class__ = StageGPT
    names = list(model.layers)
    per = -(-len(names) // pp)
    for name in names[:stage * per] + names[(stage + 1) * per:]:
        del model.layers[name]
    if stage > 0:
        del model.wte, model.wpe
    if stage < pp - 1:
        del model.ln_f, model.head
    return model


def average_gradients(model, group, size):
    if size == 1:
        return
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)
        p.grad /= size


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--loss-log", help="append {step, loss} JSON lines here (rank 0)")
    p.add_argument("--stop-at", type=int, help="end the job after this step (the schedule still spans --steps)")
    p.add_argument("--crash-at", type=int, help="SIGKILL the last rank at this step (fault drill)")
    args = p.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    if world % args.pp:
        raise SystemExit(f"--pp {args.pp} does not divide the world size {world}")
    dp = world // args.pp
    if args.global_batch % dp or (args.pp > 1 and (args.global_batch // dp) % args.microbatches):
        raise SystemExit(f"--global-batch {args.global_batch} must split evenly over dp={dp} ranks "
                         f"and {args.microbatches} microbatches")
    # ucp.Topology's rank order: dp varies faster than pp
    mesh = init_device_mesh("cpu", (args.pp, dp), mesh_dim_names=("pp", "dp"))
    stage, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    dp_group = mesh["dp"].get_group()
    last = stage == args.pp - 1
    per_rank = args.global_batch // dp

    if args.pp > 1:
        from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

        model = build_stage(stage, args.pp)
        pipe = PipelineStage(model, stage, args.pp, torch.device("cpu"), group=mesh["pp"].get_group())
        # scale_grads (default): each microbatch's gradient counts 1/microbatches, as one big batch's mean
        schedule = ScheduleGPipe(pipe, args.microbatches,
                                 loss_fn=lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()))
    else:
        model = gpt.build(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: gpt.lr_at(s, args.steps) / args.lr)
    state = {"model": model, "optim": opt, "sched": sched, "data": {"samples": 0}}

    ckpt = ucp.Checkpointer(args.ckpt, every=args.save_every, keep=2,
                            topology=ucp.Topology(dp=dp, pp=args.pp))
    start = ckpt.resume(state)  # 0 on a fresh run; otherwise the step to continue from
    for step in range(start + 1, args.steps + 1):
        if args.crash_at == step and rank == world - 1:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = gpt.batch(step, dp_rank * per_rank, per_rank)
        if args.pp > 1:
            losses = []
            if stage == 0:
                schedule.step(x)
            else:  # the last stage computes the loss of each microbatch
                schedule.step(target=y if last else None, losses=losses)
            loss = torch.stack(losses).mean().detach() if last else torch.zeros(())
        else:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            loss = loss.detach()
        average_gradients(model, dp_group, dp)
        opt.step()
        sched.step()
        opt.zero_grad()
        state["data"]["samples"] += args.global_batch
        # the global batch's loss: averaged over the last stage's dp group, then sent to rank 0
        if last:
            dist.all_reduce(loss, group=dp_group)
            loss /= dp
        if args.pp > 1:
            dist.broadcast(loss, src=(args.pp - 1) * dp)  # global rank of the last stage's dp rank 0
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item():.6f}", flush=True)
            if args.loss_log:
                with open(args.loss_log, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item(), "world": world}) + "\n")
        ckpt.maybe_save(step, state)
        if step == args.stop_at:
            break
    ckpt.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
