"""Make real torch.distributed.checkpoint (DCP) checkpoints for the DCP reader's tests.

:func:`make_checkpoints` runs on every rank of a gloo group (through ``ucp.testing.run_ranks``).
It trains a tiny GPT a few steps, sharded with FSDP2 (``fully_shard``), with DTensor tensor
parallelism (``parallelize_module``), or both (2-D), and for each case writes

* ``OUT/<case>/ckpt``: ``dcp.save({"model": ..., "optim": ...})`` of ``get_state_dict(model, opt)``,
  exactly as a training loop would (the default ``FileSystemWriter``), and
* ``OUT/fsdp2/ckpt_per_rank``: the same FSDP2 state saved with ``use_collectives=False`` (a
  ``__<rank>.metadata`` file per rank instead of one ``.metadata``), and
* ``OUT/<case>/full.pt`` (rank 0 only): the full, unsharded state that torch itself gathers with
  ``StateDictOptions(full_state_dict=True, cpu_offload=True)``, for the test to compare with.

The model is awkward on purpose: sizes that do not divide by the world size (uneven shards), a
frozen parameter, a bool and a float buffer, and two optimizer param groups with different weight
decay. The FSDP2 case gives the optimizer only trainable parameters (nested optimizer layout); the
TP case gives it every parameter, the frozen one included, and saves the flattened optimizer
layout (``flatten_optimizer_state_dict=True``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 53, 24, 4, 2, 12


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(HIDDEN)
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.k = nn.Linear(HIDDEN, HIDDEN)
        self.v = nn.Linear(HIDDEN, HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.ln2 = nn.LayerNorm(HIDDEN)
        self.fc = nn.Linear(HIDDEN, 4 * HIDDEN)
        self.out = nn.Linear(4 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.ln1(x)
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q, k, v = (m(h).view(b, t, -1, HIDDEN // HEADS).transpose(1, 2) for m in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:t, :t])
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Parameter(torch.randn(SEQ, HIDDEN) * 0.02, requires_grad=False)  # frozen
        self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)
        self.register_buffer("mask", torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
        self.register_buffer("logit_scale", torch.tensor([0.5, 2.0]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe[: idx.shape[1]]
        for layer in self.layers:
            x = layer(x, self.mask)
        return self.head(self.ln_f(x)) * self.logit_scale[0]


def param_groups(model: nn.Module, *, include_frozen: bool) -> list[dict[str, Any]]:
    """Two groups: matrices with weight decay, vectors (biases, norms) without."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad and not include_frozen:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0, "lr": 2e-3}]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(1234)  # same batch on every rank
    for _ in range(steps):
        idx = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()


def _save(model: nn.Module, opt: torch.optim.Optimizer, out: str, rank: int, *, flatten: bool,
          per_rank: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, get_state_dict)

    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=flatten))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, "ckpt"))
    if per_rank:  # also without collectives: one __<rank>.metadata per rank, replicated values saved twice
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(out, "ckpt_per_rank"),
                 use_collectives=False)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    ref = {"model": get_model_state_dict(model, options=full), "optim": get_optimizer_state_dict(model, opt, options=full)}
    if rank == 0:
        torch.save(ref, os.path.join(out, "full.pt"))
    dist.barrier()


def _fsdp2(out: str, rank: int, world_size: int) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT()
    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(param_groups(model, include_frozen=False), lr=1e-3, betas=(0.9, 0.95))
    _train(model, opt, steps=3)
    _save(model, opt, out, rank, flatten=False, per_rank=True)


def _tensor_parallel(model: nn.Module, mesh: Any) -> None:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # Vocabulary-parallel embedding and head: 53 rows do not split evenly over the ranks.
    plan: dict[str, Any] = {"wte": RowwiseParallel(input_layouts=Replicate()),
                            "head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(LAYERS):
        plan.update({f"layers.{i}.q": ColwiseParallel(), f"layers.{i}.k": ColwiseParallel(),
                     f"layers.{i}.v": ColwiseParallel(), f"layers.{i}.proj": RowwiseParallel(),
                     f"layers.{i}.fc": ColwiseParallel(), f"layers.{i}.out": RowwiseParallel()})
    parallelize_module(model, mesh, plan)


def _tp(out: str, rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = TinyGPT()
    _tensor_parallel(model, init_device_mesh("cpu", (world_size,)))
    opt = torch.optim.AdamW(param_groups(model, include_frozen=True), lr=1e-3, eps=1e-7)
    _train(model, opt, steps=2)
    _save(model, opt, out, rank, flatten=True)


def _fsdp2_tp(out: str, rank: int, world_size: int) -> None:
    """2-D: tensor parallel inside pairs of ranks, FSDP2 across them (``_StridedShard`` placements)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyGPT()
    mesh = init_device_mesh("cpu", (world_size // 2, 2), mesh_dim_names=("dp", "tp"))
    _tensor_parallel(model, mesh["tp"])
    for layer in model.layers:
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(param_groups(model, include_frozen=False), lr=1e-3)
    _train(model, opt, steps=2)
    _save(model, opt, out, rank, flatten=False)


def make_checkpoints(rank: int, world_size: int, out: str, cases: list[str]) -> None:
    """Writes ``out/<case>/ckpt`` (DCP) and ``out/<case>/full.pt`` for each of ``cases``.

    Called on every rank; collective (every rank saves its shards). Cases: ``fsdp2`` and ``tp`` (any
    world size), ``fsdp2_tp`` (an even world size, 4 or more).
    """
    makers = {"fsdp2": _fsdp2, "tp": _tp, "fsdp2_tp": _fsdp2_tp}
    for case in cases:
        makers[case](os.path.join(out, case), rank, world_size)
