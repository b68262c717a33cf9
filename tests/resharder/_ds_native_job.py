"""A stock DeepSpeed training job (no ucp import): train, save, or load with ``engine.load_checkpoint``.

Run under torchrun, one process per rank::

    python -m torch.distributed.run --nproc_per_node 3 ... tests/resharder/_ds_native_job.py \
        --load DIR --record seen.pt --steps 0 --stage 2 --dtype bf16 --groups 2 --tie

The model, its optimizer groups and the DeepSpeed config are those of ``tests/engines/_ds_train.py``
(imported by path; it imports no ucp either). The global batch is fixed (``--global-batch``) and
drawn from a generator seeded by the step, each rank taking its slice, so runs on different numbers
of ranks see the same samples. ``--scheduler``: a WarmupLR scheduler makes the learning rate depend
on the step.

- ``--load DIR``: ``engine.load_checkpoint(DIR)`` after scrambling the frozen parameter and the
  buffers (so restored values must come from the files), then ``--record PATH`` (rank 0) writes
  what the engine holds: gathered fp32 masters and Adam moments (DeepSpeed's ``safe_get_full_*``),
  module weights, frozen parameters, buffers, global step, LR scheduler state, group hyper-parameters.
- ``--steps N``: train up to global step N; ``--loss-log`` appends ``{"step", "loss"}`` lines
  (rank 0; the loss averaged over ranks); ``--save-at K`` saves with ``engine.save_checkpoint``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

TRAIN = Path(__file__).resolve().parent.parent / "engines" / "_ds_train.py"
assert "ucp" not in sys.modules


def _train_module():
    spec = importlib.util.spec_from_file_location("ds_native_job_train", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--load")
    p.add_argument("--record")
    p.add_argument("--save")
    p.add_argument("--save-at", type=int, default=-1)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--loss-log")
    p.add_argument("--global-batch", type=int, default=6)
    p.add_argument("--scheduler", action="store_true", help="a WarmupLR scheduler in the config")
    own, rest = p.parse_known_args(argv)
    train = _train_module()
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per_rank = own.global_batch // world
    args = train.parse_args(["unused", *rest, "--batch", str(per_rank)])
    model = train.build_model(args)
    if own.load:
        with torch.no_grad():  # restored values must come from the checkpoint, not the seed
            model.wpe.add_(1.0)
            model.pos_scale.mul_(-1.0)
            model.mask.logical_not_()
    opt = torch.optim.AdamW(train.param_groups(model, args.groups), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    config = train.ds_config(args)
    if own.scheduler:
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                                                              "warmup_num_steps": 3}}
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if own.load:
        path, _client = engine.load_checkpoint(own.load)
        assert path is not None, f"nothing loaded from {own.load}"
    if own.record:
        # DeepSpeed links its optimizer-state views for safe_get_full_optimizer_state at the first
        # step; before it, its own (private) lazy initialiser does the same linking.
        getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
        seen = {"step": engine.global_steps, "fp32": {}, "exp_avg": {}, "exp_avg_sq": {}, "module": {},
                "frozen": {}, "buffers": {}, "lr_scheduler": sched.state_dict() if sched else None,
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
                "opt_steps": [float(st["step"]) for st in engine.optimizer.optimizer.state.values() if "step" in st]}
        for name, prm in engine.module.named_parameters():
            if prm.requires_grad:
                seen["fp32"][name] = safe_get_full_fp32_param(prm).clone()
                for state in ("exp_avg", "exp_avg_sq"):
                    seen[state][name] = safe_get_full_optimizer_state(prm, state).clone()
        # ZeRO-3 holds only a partition of each weight: gather them whole (a no-op for ZeRO-1/2)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
            for name, prm in engine.module.named_parameters():
                seen["module"][name] = prm.detach().clone()
                if not prm.requires_grad:
                    seen["frozen"][name] = prm.detach().clone()
        seen["buffers"] = {n: b.clone() for n, b in engine.module.named_buffers()}
        if rank == 0:
            torch.save(seen, own.record)
    while engine.global_steps < own.steps:
        step = engine.global_steps
        gen = torch.Generator().manual_seed(1000 + step)
        idx = torch.randint(0, args.vocab, (own.global_batch, args.seq + 1), generator=gen)
        idx = idx[rank * per_rank:(rank + 1) * per_rank]
        logits = engine(idx[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), idx[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        if rank == 0 and own.loss_log:
            with open(own.loss_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": engine.global_steps, "loss": mean.item() / world}) + "\n")
        if engine.global_steps == own.save_at:
            engine.save_checkpoint(own.save)
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/engines/_ds_train.py: skip gloo/shm destructors that may abort


if __name__ == "__main__":
    main(sys.argv[1:])
