"""Train a tiny GPT with DeepSpeed for a few steps and save a real DeepSpeed checkpoint.

Run it under a distributed launcher, one process per rank, for example::

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        --master_port 29512 tests/engines/_ds_train.py OUT --stage 2 --dtype bf16

Every rank writes only its share of the DeepSpeed checkpoint under ``OUT`` (DeepSpeed's own
``save_checkpoint``: ``OUT/latest`` and ``OUT/global_stepN/*``, after the last step or ``--save-at``);
with ``--loss-log`` rank 0 also writes ``OUT.losses.json`` beside it, nothing else. The model is
built from ``--seed`` before DeepSpeed sees it, so a test can rebuild the same initial model with
:func:`build_model` and compare what never changes during training (the frozen parameter, buffers).

The model is deliberately awkward for a checkpoint reader: sizes are not multiples of the world
size (so ZeRO pads), one parameter is frozen, there are a bool and a float buffer, the lm head may be
tied to the embedding, and the optimizer may have two parameter groups with different weight decay.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, 4 * hidden)
        self.out = nn.Linear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        att = att.masked_fill(~mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Embedding, ``layers`` blocks, final layernorm and an lm head (tied or not)."""

    def __init__(self, *, vocab: int, hidden: int, heads: int, layers: int, seq: int, tie: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, hidden)
        nn.init.normal_(self.wte.weight, std=0.02)  # GPT-2's init; keeps a tied head's logits sane
        # Frozen on purpose: the reader must find parameters that the optimizer never sees.
        self.wpe = nn.Parameter(torch.randn(seq, hidden) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        if tie:
            self.head.weight = self.wte.weight
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))
        self.register_buffer("pos_scale", torch.linspace(0.5, 1.5, seq).unsqueeze(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe[:t] * self.pos_scale[:t].to(self.wpe.dtype)
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.ln_f(x))


def mean_over_ranks(loss: torch.Tensor) -> float:
    """The step's loss averaged over the data-parallel ranks (a sum, then a division)."""
    total = loss.detach().float().clone()
    torch.distributed.all_reduce(total)
    return total.item() / torch.distributed.get_world_size()


def build_model(args: argparse.Namespace) -> TinyGPT:
    """The model exactly as every rank builds it before DeepSpeed takes over (fp32)."""
    torch.manual_seed(args.seed)
    return TinyGPT(vocab=args.vocab, hidden=args.hidden, heads=args.heads, layers=args.layers,
                   seq=args.seq, tie=args.tie)


def param_groups(model: nn.Module, groups: int) -> list[dict]:
    """Trainable parameters in one group, or split into decayed (>= 2-D) and not decayed."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if groups == 1:
        return [{"params": trainable, "weight_decay": 0.1}]
    return [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]


def ds_config(args: argparse.Namespace) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 1_000_000,
        "zero_optimization": {"stage": args.stage},
        # DeepSpeed's default, stated: a job continuing this run (another engine) must clip alike
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.dtype == "bf16"},
        "fp16": {"enabled": args.dtype == "fp16", "initial_scale_power": 8},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
        # fp32 gradient accumulation makes DeepSpeed use its BF16_Optimizer for ZeRO-1 + bf16.
        "data_types": {"grad_accum_dtype": args.grad_accum_dtype or args.dtype},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="checkpoint directory to create (DeepSpeed's save_dir)")
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--grad-accum-dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="gradient accumulation dtype (default: the model dtype)")
    p.add_argument("--groups", type=int, choices=(1, 2), default=1, help="optimizer param groups")
    p.add_argument("--tie", action="store_true", help="tie the lm head to the embedding")
    p.add_argument("--vocab", type=int, default=67)
    p.add_argument("--hidden", type=int, default=20)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=9)
    p.add_argument("--batch", type=int, default=2, help="micro batch per rank")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save-at", type=int, default=None,
                   help="save after this step, then train on to --steps (default: save after the last)")
    p.add_argument("--loss-log", action="store_true",
                   help="write each step's loss, averaged over the ranks, to OUT.losses.json (rank 0)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import deepspeed  # only the launched ranks need DeepSpeed; tests import build_model alone

    t0 = time.perf_counter()
    if args.dtype == "fp16":
        # DeepSpeed's CPU accelerator reports no fp16 support, although torch runs fp16 on CPU; claim
        # it so the fp16 ZeRO path (dynamic loss scaling, its own file names) can be exercised here.
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        if accel.device_name() == "cpu":
            accel.is_fp16_supported = lambda: True
            accel.supported_dtypes = lambda: [torch.float, torch.half, torch.bfloat16]
    deepspeed.init_distributed(dist_backend="gloo")
    model = build_model(args)
    optimizer = torch.optim.AdamW(param_groups(model, args.groups), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(args))
    rank = engine.global_rank
    gen = torch.Generator().manual_seed(args.seed + 1000 + rank)
    losses = []
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
        logits = engine(idx[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), idx[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        if args.loss_log:
            losses.append(mean_over_ranks(loss))
        if step == (args.save_at or args.steps):
            engine.save_checkpoint(args.out, client_state={"universal_checkpoint_info": {}})
    if args.loss_log and rank == 0:
        with open(f"{args.out}.losses.json", "w") as f:
            json.dump(losses, f)
    if rank == 0:
        print(f"saved {args.out} stage={args.stage} dtype={args.dtype} loss={loss.item():.4f} "
              f"in {time.perf_counter() - t0:.1f}s", flush=True)
    torch.distributed.barrier()  # every rank's files are written and closed past this point
    # Leave without running C++ destructors: tearing down gloo and DeepSpeed's CPU shared-memory
    # communicator at interpreter exit sometimes aborts a rank ("terminate called without an active
    # exception") after a complete save, which would fail the launch for nothing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
