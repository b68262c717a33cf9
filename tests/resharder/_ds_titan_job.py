"""A stock DeepSpeed job (no ucp import) holding torchtitan's own Llama 3 model.

Run under torchrun, one process per rank::

    python -m torch.distributed.run --nproc_per_node 2 ... tests/resharder/_ds_titan_job.py DS_DIR SEEN.pt
    python -m torch.distributed.run --nproc_per_node 3 ... tests/resharder/_ds_titan_job.py DS_DIR - \
        STEPS LOSS.jsonl BATCH MAX_NORM

Builds ``tests/engines/_titan_make.py``'s model config (same sizes) with torchtitan's builder, with
``fuse_qkv=False`` (separate ``wq``/``wk``/``wv``: a fused ``wqkv`` parameter's flat layout, per KV
group its query heads, key and value, is not what a universal checkpoint's separate parameters lay
end to end), initialises it with a seed other than the training job's, wraps it with
``deepspeed.initialize`` (fp32, ZeRO-2, ``torch.optim.AdamW`` with torchtitan's two param groups
in its order: the parameters its first pattern leaves, with weight decay, then the norms), loads ``DS_DIR`` with plain ``engine.load_checkpoint``
and rank 0 records the gathered fp32 masters and Adam moments, module weights, buffers, the
engine's step and the optimizer's steps and hyper-parameters. With ``STEPS`` it records nothing:
it trains on to step ``STEPS`` as torchtitan's job of ``_titan_make.py`` does (see :func:`train`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

assert "ucp" not in sys.modules
MAKE = Path(__file__).resolve().parent.parent / "engines" / "_titan_make.py"


def main(load: str, record: str, steps: str = "0", loss_log: str = "", batch: str = "0",
         max_norm: str = "1.0") -> None:
    spec = importlib.util.spec_from_file_location("ds_titan_job_make", MAKE)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    with torch.device("meta"):
        model = make.tiny_llama_config(fuse_qkv=False).build()
    model.to_empty(device="cpu")
    torch.manual_seed(99)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    adamw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    rest = [p for n, p in model.named_parameters() if "norm" not in n]
    opt = torch.optim.AdamW([{"params": rest, "weight_decay": 0.1}, {"params": norms, "weight_decay": 0.0}],
                            **adamw)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    if int(steps):
        return train(make, model, opt, config, load, int(steps), loss_log, int(batch), float(max_norm), rank,
                     world)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    path, _ = engine.load_checkpoint(load, load_lr_scheduler_states=False)
    assert path is not None, f"nothing loaded from {load}"
    getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
    seen = {"step": engine.global_steps, "fp32": {}, "exp_avg": {}, "exp_avg_sq": {},
            "module": {n: p.detach().clone() for n, p in engine.module.named_parameters()},
            "buffers": {n: b.clone() for n, b in engine.module.named_buffers()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
            "opt_steps": [float(st["step"]) for st in engine.optimizer.optimizer.state.values() if "step" in st]}
    for name, prm in engine.module.named_parameters():
        seen["fp32"][name] = safe_get_full_fp32_param(prm).clone()
        for state in ("exp_avg", "exp_avg_sq"):
            seen[state][name] = safe_get_full_optimizer_state(prm, state).clone()
    if rank == 0:
        torch.save(seen, record)
    _exit()


def train(make, model, opt, config, load: str, steps: int, loss_log: str, batch: int, max_norm: float,
          rank: int, world: int) -> None:
    """Continues torchtitan's run: ``make.global_batch``'s samples (this rank's slice of ``batch``
    rows), torchtitan's gradient clipping (DeepSpeed's ``gradient_clipping`` set to its ``max_norm``) and
    its LR schedule, the job's own ``LambdaLR`` with torchtitan's warmup/decay function (built by
    torchtitan's ``LRSchedulersContainer`` from ``make``'s config), set to the step loaded: ucp
    writes no scheduler state from a torchtitan source, so the job restores what torchtitan's own
    ``load_state_dict`` restores, ``last_epoch``, from the engine's step. Trains the steps after
    that to ``steps``; rank 0 appends each step's loss, averaged over the ranks, to ``loss_log``."""
    import json

    import deepspeed
    import torch.nn.functional as F

    schedulers = make.lr_schedulers([opt])
    config = {**config, "train_micro_batch_size_per_gpu": batch // world, "gradient_clipping": max_norm}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=schedulers.schedulers[0],
                                           config=config)
    path, _ = engine.load_checkpoint(load, load_lr_scheduler_states=False)
    assert path is not None, f"nothing loaded from {load}"
    schedulers.load_state_dict({"last_epoch": engine.global_steps})
    for step in range(engine.global_steps + 1, steps + 1):
        tokens = make.global_batch(step, batch).chunk(world)[rank]
        lrs = [g["lr"] for g in engine.optimizer.param_groups]
        loss = F.cross_entropy(engine(tokens[:, :-1]).float().flatten(0, 1), tokens[:, 1:].flatten(0, 1))
        engine.backward(loss)
        engine.step()
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        if rank == 0:
            with open(loss_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "loss": mean.item() / world, "lr": lrs}) + "\n")
    _exit()


def _exit() -> None:
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/engines/_ds_train.py: skip gloo/shm destructors that may abort


if __name__ == "__main__":
    main(*sys.argv[1:])
