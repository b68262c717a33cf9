"""Train tiny models with DeepSpeed's model-parallel features and save real DeepSpeed checkpoints.

Modes (one per run, under torchrun, CPU + gloo):

- ``pipe``: a ``PipelineModule`` over all ranks' pipeline stages (``--pp``; dp = world / pp), with the
  embedding tied to the lm head through ``TiedLayerSpec``, ZeRO-1, bf16.
- ``autotp``: a tiny ``transformers`` Llama sharded by AutoTP (``tensor_parallel.autotp_size`` =
  world), ZeRO-1 (``--zero``: 1, 2 or 3), bf16; ``--kv-heads`` picks even or uneven GQA heads, ``--bias``
  gives every projection a bias (``attention_bias``, ``mlp_bias``).
- ``moe``: a model with a ``deepspeed.moe.layer.MoE`` block (``--experts``, ep = world), ZeRO-2, bf16.

After training, every rank writes what DeepSpeed itself gathers for each of its parameters
(``safe_get_full_fp32_param``, ``safe_get_full_optimizer_state``) to ``OUT.gathered/rank-R.pt`` (a
test's reference; ucp never reads it), then the DeepSpeed checkpoint goes to ``OUT``.

``--load DIR`` (with ``--steps 0``): instead of saving, a stock job loads ``DIR`` with plain
``engine.load_checkpoint`` (after scrambling the buffers, and a pipeline's frozen parameters, so
restored values must come from the files) and writes what its engine holds to
``OUT.gathered/rank-R.pt``. Every record also holds the engine's global step and LR scheduler state
(``--scheduler``: a WarmupLR schedule).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, SEQ, BATCH = 61, 16, 8, 2


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, HIDDEN) * 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.weight)


def _head(embed: Embed, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, embed.weight)  # the tied lm head


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.fc = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(3 * HIDDEN, HIDDEN)
        self.register_buffer("gain", torch.linspace(0.9, 1.1, HIDDEN))  # a buffer the reader must keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(F.gelu(self.fc(self.ln(x)))) * self.gain.to(x.dtype)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), labels.reshape(-1))


class FrozenScale(nn.Module):
    """A layer whose only parameter is frozen (created so: DeepSpeed's partition does not count it)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, HIDDEN), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.to(x.dtype)


def _halve(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5  # a layer that is a function: no state, no layer file


def build_pipe(args):
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    blocks = [LayerSpec(Block) for _ in range(args.layers)]
    if args.stateless:  # after the first block: a function (no file), a module without state (an empty
        blocks[1:1] = [_halve, LayerSpec(nn.Identity), LayerSpec(FrozenScale)]  # file), a frozen parameter
    layers = [TiedLayerSpec("embed", Embed)] + blocks + [
        LayerSpec(nn.LayerNorm, HIDDEN), TiedLayerSpec("embed", Embed, forward_fn=_head)]
    return PipelineModule(layers=layers, num_stages=args.pp, loss_fn=_loss, partition_method=args.partition)


def build_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB + 3, hidden_size=args.heads * 4, intermediate_size=40,
                      num_hidden_layers=2, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=32, tie_word_embeddings=False,
                      attention_bias=args.bias, mlp_bias=args.bias)
    model = LlamaForCausalLM(cfg)
    model.model.norm.weight.requires_grad_(False)  # a frozen parameter the reader must keep
    return model


class MoeNet(nn.Module):
    def __init__(self, args) -> None:
        from deepspeed.moe.layer import MoE

        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Parameter(torch.randn(SEQ, HIDDEN) * 0.02, requires_grad=False)  # frozen
        self.block = Block()
        expert = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))
        self.moe = MoE(HIDDEN, expert, num_experts=args.experts, ep_size=args.ep, k=1, min_capacity=SEQ * BATCH)
        self.ln = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.block(self.embed(idx) + self.pos[:idx.shape[1]])
        y, _, _ = self.moe(x)
        return self.head(self.ln(x + y))


def config(args) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
           "steps_per_print": 1_000_000, "zero_allow_untested_optimizer": True, "bf16": {"enabled": True},
           "zero_optimization": {"stage": args.zero or (2 if args.mode == "moe" else 1)}}
    if args.mode == "autotp":
        cfg["tensor_parallel"] = {"autotp_size": args.tp}
    if args.data_before_expert:
        cfg["use_data_before_expert_parallelism"] = True
    if args.scheduler:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                           "warmup_num_steps": 5}}
    return cfg


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--mode", choices=("pipe", "autotp", "moe"), required=True)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--bias", action="store_true", help="autotp: q/k/v/o and MLP projections with biases")
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--data-before-expert", action="store_true", help="DeepSpeed's D + E rank order")
    p.add_argument("--zero", type=int, help="ZeRO stage (default: 2 for moe, else 1)")
    p.add_argument("--layers", type=int, default=3, help="pipe: Blocks between the embedding and the final norm")
    p.add_argument("--partition", default="uniform", help="pipe: the PipelineModule's partition_method")
    p.add_argument("--stateless", action="store_true",
                   help="pipe: a function, a stateless module and a frozen-only layer after block 1")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--scheduler", action="store_true", help="a WarmupLR scheduler in the config")
    p.add_argument("--load", help="load this checkpoint with engine.load_checkpoint instead of saving")
    return p.parse_args(argv)


def _param_groups(model: nn.Module, args) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if p.dim() >= 2], "weight_decay": 0.1, "name": "decay"},
              {"params": [p for n, p in named if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"}]
    if args.mode == "moe":
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def _gathered(engine) -> dict:
    """What DeepSpeed itself gathers for each parameter this rank holds (fp32 master and moments),
    its frozen parameters and its buffers."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed links a group's moments to its parameters when it first sees them; groups whose
        # state appeared later stay unlinked and its own gather would fail for them: link again.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        states = {"fp32": safe_get_full_fp32_param(p), "param": p.detach().clone()}
        for s in ("exp_avg", "exp_avg_sq"):
            states[s] = safe_get_full_optimizer_state(p, s)
        out[name] = {k: v.detach().clone() for k, v in states.items() if v is not None}
    frozen = {n: p.detach().clone() for n, p in engine.module.named_parameters() if not p.requires_grad}
    saved = set(engine.module.state_dict())  # persistent buffers only (not Llama's rotary inv_freq)
    buffers = {n: b.detach().clone() for n, b in engine.module.named_buffers() if n in saved}
    sched = engine.lr_scheduler
    return {"params": out, "frozen": frozen, "buffers": buffers, "step": engine.global_steps,
            "lr_scheduler": sched.state_dict() if sched is not None else None}


def main(argv=None) -> None:
    args = parse_args(argv)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(args.seed)
    model = {"pipe": build_pipe, "autotp": build_llama, "moe": MoeNet}[args.mode](args)
    optimizer = torch.optim.AdamW(_param_groups(model, args), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    if args.load:
        with torch.no_grad():  # restored buffers must come from the checkpoint, not the seed
            for buf in model.buffers():
                buf.add_(1.0)
            if args.mode == "pipe":  # and frozen parameters, which only the layer files restore
                for p in model.parameters():
                    if not p.requires_grad:
                        p.add_(1.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config(args))
    rank = engine.global_rank
    if args.load:
        path, _client = engine.load_checkpoint(args.load)
        assert path is not None, f"nothing loaded from {args.load}"
    gen = torch.Generator().manual_seed(args.seed + 7)  # the same batches on every rank (TP needs it)
    for _ in range(args.steps):
        idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        if args.mode == "pipe":
            engine.train_batch(iter([(idx[:, :-1], idx[:, 1:])]))
            continue
        if args.mode == "autotp":
            loss = engine(input_ids=idx[:, :-1], labels=idx[:, :-1]).loss
        else:
            loss = _loss(engine(idx[:, :-1]), idx[:, 1:])
        engine.backward(loss)
        engine.step()
    if not args.load:
        engine.save_checkpoint(args.out)
    os.makedirs(args.out + ".gathered", exist_ok=True)
    torch.save(_gathered(engine), os.path.join(args.out + ".gathered", f"rank-{rank}.pt"))
    if args.mode == "autotp" and rank == 0:  # what `ucp export --config` needs for from_pretrained
        model.config.save_pretrained(args.out + ".gathered")
    torch.distributed.barrier()
    if rank == 0:
        print(f"saved {args.out} ({args.mode})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see _ds_train.py: C++ teardown at exit may abort a rank after a complete save


if __name__ == "__main__":
    main()
