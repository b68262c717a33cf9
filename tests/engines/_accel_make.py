"""Make a real accelerate FSDP2 ``save_state`` checkpoint (run on every rank via ``run_ranks``).

:func:`make_accelerate` trains a tiny Hugging Face Llama a few steps under ``accelerate.Accelerator``
with FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``, sharded state dicts) on CPU and
calls ``accelerator.save_state(OUT/state)``, which writes ``pytorch_model_fsdp_0/`` (DCP of
``{"model": ...}``) and ``optimizer_0/`` (DCP of ``{"optimizer": ...}``) side by side, plus the
scheduler and RNG files. The final norm is frozen and the model has a persistent buffer. On CPU accelerate picks plain multi-process CPU training (DDP), so the job
forces the distributed type to FSDP before ``prepare``, as a GPU run would have it.

Rank 0 also writes ``OUT/full.pt``: the full state torch gathers from the prepared model and
optimizer (``full_state_dict=True``) and the scheduler's ``state_dict()``.
"""

from __future__ import annotations

import os

import torch

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS, SEQ = 80, 32, 4, 2, 2, 12


def build(rank: int, world_size: int):
    """The job's ``Accelerator`` (FSDP2, sharded state dicts) and its prepared model, optimizer and
    scheduler, before any training step (also what a job resuming from a ``save_state`` builds)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import LlamaConfig, LlamaForCausalLM

    # run_ranks has joined the gloo group already; accelerate reads the launcher's variables
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1")
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT",
                                            reshard_after_forward=True)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    accelerator.state.distributed_type = DistributedType.FSDP  # CPU would otherwise mean DDP
    accelerator.state.fsdp_plugin = plugin
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ * 2,
                                         attn_implementation="sdpa"))
    model.model.norm.weight.requires_grad_(False)  # a frozen parameter (sharded, no optimizer state)
    model.register_buffer("logit_scale", torch.tensor([0.5, 2.0]))  # a persistent buffer
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2]},
                             {"params": [p for p in trainable if p.dim() < 2],
                              "weight_decay": 0.0, "lr": 2e-3}], lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
    model, opt, sched = accelerator.prepare(model, opt, sched)  # FSDP2 takes both at once
    accelerator.state.distributed_type = DistributedType.FSDP  # prepare() re-derived it from the CPU
    return accelerator, model, opt, sched


def make_accelerate(rank: int, world_size: int, out: str) -> None:
    """Trains 3 steps and saves with ``save_state``; collective (every rank)."""
    from accelerate.utils import DistributedType

    accelerator, model, opt, sched = build(rank, world_size)
    gen = torch.Generator().manual_seed(7 + rank)
    for _ in range(3):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        accelerator.backward(model(input_ids=ids, labels=ids).loss)
        opt.step()
        sched.step()
        opt.zero_grad()
    accelerator.state.distributed_type = DistributedType.FSDP  # training re-derived it from the CPU
    accelerator.save_state(os.path.join(out, "state"))
    write_reference(model, opt, sched, os.path.join(out, "full.pt"), rank)


def write_reference(model, opt, sched, path: str, rank: int) -> None:
    """The full state torch gathers (``full_state_dict=True``) and the scheduler's state, to ``path``
    (rank 0 writes; collective)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    inner = getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps torch's
    ref = {"model": get_model_state_dict(model, options=full),
           "optim": get_optimizer_state_dict(model, inner, options=full),
           "scheduler": sched.state_dict()}
    if rank == 0:
        torch.save(ref, path)
    dist.barrier()
