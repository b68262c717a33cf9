"""Make real torchtitan 0.3 checkpoints for the conversion tests (run on every rank via ``run_ranks``).

:func:`make_titan` builds a tiny Llama 3 with torchtitan's own parts (its model config and
builders, ``parallelize_llama`` with FSDP2 over the ranks, ``OptimizersContainer`` and
``LRSchedulersContainer``, ``CheckpointManager``) on CPU with SDPA attention, trains a few steps and
lets the CheckpointManager save ``OUT/checkpoint/step-N`` as ``torchtitan.train`` does: the full state
every two steps (``step-2``, ``step-4``) and, with its default ``last_save_model_only``, the model
alone at the last step (``step-5``). Grouped-query attention (4 heads, 2 KV heads) with torchtitan's fused ``wqkv`` projection:
the model state dict holds ``wq``/``wk``/``wv`` (split by torchtitan's save hook) while the
optimizer state is keyed by the fused parameter ``wqkv``.

Rank 0 also writes ``OUT/full-<N>.pt`` at steps 4 and 5: what torch itself gathers after that save
(``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True``), the learning
rate scheduler's and the train state's ``state_dict()``, the attention sizes, and torchtitan's own
model's logits on a fixed batch (``tokens``, ``logits``: the reference of the Hugging Face export).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

DIM, HEADS, KV_HEADS, VOCAB, LAYERS, SEQ = 64, 4, 2, 96, 2, 16
STEPS, INTERVAL, REFERENCE_STEPS = 5, 2, (4, 5)


class TrainState:
    """What torchtitan's Trainer saves as ``train_state`` (its ``state_dict``)."""

    def __init__(self) -> None:
        self.step, self.ntokens_seen = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "ntokens_seen": self.ntokens_seen}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.ntokens_seen = sd["step"], sd["ntokens_seen"]


def tiny_llama_config(fuse_qkv: bool = True) -> Any:
    """torchtitan's Llama 3 config (as its ``debugmodel`` flavor builds it), smaller, SDPA attention;
    ``fuse_qkv=False``: separate ``wq``/``wk``/``wv`` parameters (the names torchtitan saves under)."""
    from torchtitan.models import llama3
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm, compute_ffn_hidden_dim
    from torchtitan.models.common.attention import ScaledDotProductAttention

    layers = llama3._build_llama3_layers(
        n_layers=LAYERS, dim=DIM, n_heads=HEADS, n_kv_heads=KV_HEADS,
        hidden_dim=compute_ffn_hidden_dim(DIM, multiple_of=32),
        rope=ComplexRoPE.Config(dim=DIM // HEADS, max_seq_len=SEQ * 2, theta=500000, scaling="llama"),
        attn_backend="flex", fuse_qkv=fuse_qkv)
    for layer in layers:  # flex attention needs a compiler on CPU; SDPA runs in eager mode
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return llama3.Llama3Model.Config(
        dim=DIM, vocab_size=VOCAB,
        tok_embeddings=Embedding.Config(num_embeddings=VOCAB, embedding_dim=DIM, param_init=llama3._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=DIM, param_init=llama3._NORM_INIT),
        lm_head=Linear.Config(in_features=DIM, out_features=VOCAB, param_init=llama3._output_linear_init(DIM)),
        layers=layers)


def _build(world_size: int, out: str, fuse_qkv: bool = True) -> tuple[Any, Any, Any]:
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims, parallel_dims
    from torchtitan.models.llama3 import parallelize_llama

    parallel_dims.device_type = "cpu"  # torchtitan assumes "cuda" when no accelerator is found
    # FSDP2 over every rank on DTensors ("partial_dtensor"); the default "spmd_types" backend needs
    # the Trainer's model setup, which this job does not reproduce
    dims = ParallelDims.from_config(ParallelismConfig(spmd_backend="partial_dtensor"), world_size)
    dims.build_mesh()
    with torch.device("meta"):
        model = tiny_llama_config(fuse_qkv).build()
    model = parallelize_llama(model, parallel_dims=dims, training=TrainingConfig(mixed_precision_param="float32"),
                              parallelism=ParallelismConfig(spmd_backend="partial_dtensor"), compile_config=CompileConfig(), ac_config=None,
                              dump_folder=out)
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():  # gloo lacks PREMUL_SUM; torchtitan divides by 1.0 anyway
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    adamw = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    optimizers = OptimizersContainer.Config(implementation="for-loop", param_groups=[
        ParamGroupConfig(pattern=r"norm", optimizer_name="AdamW", optimizer_kwargs={**adamw, "weight_decay": 0.0}),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamW", optimizer_kwargs={**adamw, "weight_decay": 0.1}),
    ]).build(model_parts=[model])
    return model, optimizers, lr_schedulers(optimizers)


def lr_schedulers(optimizers: Any) -> Any:
    """torchtitan's LR schedulers (its ``LRSchedulersContainer``: linear warmup over 2 steps, then
    linear decay to step 10), one ``LambdaLR`` per optimizer of ``optimizers`` (torchtitan's
    container, or a list of torch optimizers)."""
    from torchtitan.components.optimizer import LRSchedulersContainer

    return LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=10)


def global_batch(step: int, batch: int) -> torch.Tensor:
    """The fixed samples of training step ``step``: ``batch`` rows of ``SEQ + 1`` tokens, the same
    for any number of ranks (each data-parallel rank trains on its slice of consecutive rows)."""
    return torch.randint(0, VOCAB, (batch, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))


def make_titan(rank: int, world_size: int, out: str, steps: int = STEPS, batch: int | None = None,
               max_norm: float | None = None, loss_log: str | None = None) -> None:
    """Trains ``steps`` steps on every rank, saving ``out/checkpoint/step-N`` every ``INTERVAL``.

    By default each rank draws its own samples and the loss is torch's mean over them. With
    ``batch``, every step trains on :func:`global_batch` (this rank's slice) as torchtitan's Trainer
    does: its summed cross-entropy (torchtitan's ``cross_entropy_loss``) divided by the global token
    count (FSDP sums the gradients), gradients clipped to ``max_norm`` with torchtitan's
    ``clip_grad_norm_`` when given; rank 0 appends each step's global mean loss to ``loss_log``
    (JSON lines ``{"step", "loss", "lr"}``: ``lr`` the learning rate of each param group at that step)."""
    import json

    import torch.distributed as dist
    from torchtitan.components.checkpoint import CheckpointManager

    model, optimizers, schedulers = _build(world_size, out)
    state = TrainState()
    ckpt = CheckpointManager(CheckpointManager.Config(enable=True, interval=INTERVAL, keep_latest_k=0),
                             dataloader=None, model_parts=[model], optimizers=optimizers,
                             lr_schedulers=schedulers, states={"train_state": state}, sd_adapter=None,
                             base_folder=out)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as data parallelism does
    for step in range(1, steps + 1):
        if batch is None:
            tokens = torch.randint(0, VOCAB, (2, SEQ + 1), generator=gen)
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        else:
            tokens = global_batch(step, batch).chunk(world_size)[rank]
            lrs = [g["lr"] for o in optimizers.optimizers for g in o.param_groups]
            loss = _global_mean_step(model, tokens, batch, max_norm)
            if loss_log is not None:
                dist.all_reduce(loss)  # the local sums over the global token count add up to the mean
                if rank == 0:
                    with open(loss_log, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": step, "loss": loss.item(), "lr": lrs}) + "\n")
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        state.step, state.ntokens_seen = step, state.ntokens_seen + tokens.numel()
        ckpt.save(step, last_step=step == steps)  # as torchtitan's Trainer calls it
        if step in REFERENCE_STEPS:
            _write_reference(model, optimizers, schedulers, state, os.path.join(out, f"full-{step}.pt"), rank)
    ckpt.close()


def _global_mean_step(model: Any, tokens: torch.Tensor, batch: int, max_norm: float | None) -> torch.Tensor:
    """Forward and backward of this rank's ``tokens`` as torchtitan's Trainer normalises the loss
    (local sum over the global token count ``batch * SEQ``), then its gradient clipping; returns
    the detached local share of the loss."""
    from torchtitan.components.loss import cross_entropy_loss
    from torchtitan.distributed import utils as dist_utils

    loss = cross_entropy_loss(model(tokens[:, :-1]), tokens[:, 1:]) / (batch * SEQ)
    loss.backward()
    if max_norm is not None:
        dist_utils.clip_grad_norm_(list(model.parameters()), max_norm, foreach=True)
    return loss.detach().clone()


def _write_reference(model: Any, optimizers: Any, schedulers: Any, state: TrainState, out: str,
                     rank: int) -> None:
    """The full state, gathered by torch (``DTensor.full_tensor``) from torchtitan's own state dicts.

    (``get_model_state_dict`` cannot: torchtitan's save hook renames ``wqkv`` to ``wq``/``wk``/``wv``.)
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torchtitan.components.optimizer.utils import get_flat_optim_state_dict

    def full(sd: dict[str, Any]) -> dict[str, Any]:
        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sd.items()}

    ref = {"model": full(model.state_dict()),
           "optim": full({k: v for o in optimizers.optimizers for k, v in get_flat_optim_state_dict(o).items()}),
           "lr_scheduler": schedulers.state_dict(), "train_state": state.state_dict(),
           "head_dim": DIM // HEADS, "heads": HEADS, "kv_heads": KV_HEADS}
    ref["tokens"] = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # every rank runs the same batch (FSDP2 gathers the weights)
        logits = model(ref["tokens"])
    ref["logits"] = logits.full_tensor() if isinstance(logits, DTensor) else logits
    if rank == 0:
        torch.save(ref, out)
    dist.barrier()
