"""Train the tiny GPT under DeepSpeed ZeRO-2 (bf16, CPU ranks), checkpointing through ucp.

    torchrun --nproc_per_node 2 examples/train_deepspeed.py --ckpt /tmp/dsrun --steps 20 --save-every 10
    torchrun --nproc_per_node 3 examples/train_deepspeed.py --ckpt /tmp/dsrun --steps 20   # resumes at 10

Each save snapshots the live engine (fp32 master partitions, optimizer states, weights, step
counters, LR scheduler, RNG) and writes it through ``ucp.save`` into ``CKPT/step-NNNNNNNN`` in the
background: ``maybe_save`` returns once the snapshot is copied. A resume reshards the newest
committed step for the current number of ranks and loads it through DeepSpeed's universal loader.
The global batch is fixed and the learning rate follows a schedule whose state is saved, so a run
resumed on another number of ranks sees the same samples and learning rates.
"""

import argparse
import json
import logging
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F

import gpt
import ucp


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--stage", type=int, choices=(1, 2), default=2)
    p.add_argument("--global-batch", type=int, default=12)
    p.add_argument("--loss-log", help="append {step, loss} JSON lines here (rank 0)")
    p.add_argument("--stop-at", type=int, help="end the job after this step (the schedule still spans --steps)")
    args = p.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    per_rank = args.global_batch // world
    model = gpt.build(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=gpt.lr_at(0, args.steps), weight_decay=0.1)
    # After k optimizer steps the scheduler gives training step k + 1 its learning rate.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: gpt.lr_at(k + 1, args.steps) / gpt.lr_at(0, args.steps))
    config = {"train_micro_batch_size_per_gpu": per_rank, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": True},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)

    ckpt = ucp.deepspeed.Checkpointer(args.ckpt, every=args.save_every, keep=2)
    start = ckpt.resume(engine)  # 0 on a fresh run; otherwise the step to continue from
    for step in range(start + 1, args.steps + 1):
        x, y = gpt.batch(step, rank * per_rank, per_rank)
        loss = F.cross_entropy(engine(x).float().flatten(0, 1), y.flatten())
        engine.backward(loss)
        engine.step()  # also steps the LR scheduler
        dist.all_reduce(loss := loss.detach())
        if rank == 0:
            print(f"step {step:3d}  loss {loss.item() / world:.6f}", flush=True)
            if args.loss_log:
                with open(args.loss_log, "a") as f:
                    f.write(json.dumps({"step": step, "loss": loss.item() / world, "world": world}) + "\n")
        ckpt.maybe_save(step, engine)  # blocks only while the snapshot is copied
        if step == args.stop_at:
            break
    ckpt.close()
    dist.barrier()
    # Skip interpreter teardown: destroying gloo and DeepSpeed's CPU shared-memory communicator at
    # exit sometimes aborts a rank after all work is done (see tests/engines/_ds_train.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
