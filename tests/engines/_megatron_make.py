"""Rank functions that train a tiny Megatron-core GPT on CPU/gloo and save it with Megatron's own
``dist_checkpointing`` (torch_dist), or load such a checkpoint back at another topology.

Run through ``ucp.testing.run_ranks``. Megatron-core targets CUDA; on CPU three things are redirected
in the rank process only (never in the test process): ``torch.cuda`` device calls answer "cpu",
CUDA streams/events/synchronize are no-ops, and ``Tensor.type()`` reports a CPU tensor under its
``torch.cuda.*`` name (the distributed optimizer sorts parameters by that string).
"""

from __future__ import annotations

import contextlib
import os
import queue
import warnings
from typing import Any

import torch
from safetensors.torch import save_file
from torch.overrides import TorchFunctionMode

#: The tiny model: 4 layers, GQA (4 heads in 2 query groups), SwiGLU (fc1 = [gate; up]).
MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)
VOCAB, SEQ, BATCH = 128, 16, 2
STEPS = 2


class _Stream:
    """Stands in for ``torch.cuda.Stream`` / ``Event``: everything is synchronous on CPU."""

    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


def _redirect_cuda() -> None:
    """Point the ``torch.cuda`` calls Megatron-core makes at the CPU (see the module docstring)."""
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Stream
    cuda.Event = _Stream
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # Megatron's RNG tracker keeps a CUDA generator state per region; dropout is off, so any state does
    cuda.get_rng_state = cuda.random.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.manual_seed = lambda *a, **k: None
    plain = torch.Tensor.type

    def typed(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            return plain(self, *args, **kwargs)
        name = plain(self)
        return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = typed  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    _CpuDevices().__enter__()  # for the whole rank process


def _cpu(value: Any) -> Any:
    return "cpu" if isinstance(value, (str, torch.device)) and str(value).startswith("cuda") else value


class _CpuDevices(TorchFunctionMode):
    """Tensors Megatron creates with ``device="cuda"`` (flags, masks, scales) are made on the CPU."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = {k: _cpu(v) if k == "device" else v for k, v in (kwargs or {}).items()}
        if func in (torch.Tensor.to,):
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


def _setup(tp: int, pp: int, seed: int) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _redirect_cuda()
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _build(tp: int, pp: int, bf16: bool, vocab: int = VOCAB, shape: dict | None = None) -> tuple[Any, Any]:
    """A DDP-wrapped tiny GPTModel (``vocab``: its vocabulary size, padding included; ``shape``: its
    TransformerConfig sizes, default :data:`MODEL`) and its distributed Adam optimizer."""
    import torch.nn.functional as F
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    config = TransformerConfig(**(shape or MODEL), tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               gated_linear_unit=True, hidden_dropout=0.0, attention_dropout=0.0, activation_func=F.silu, add_bias_linear=False,
                               use_cpu_initialization=True, params_dtype=dtype, bf16=bf16,
                               pipeline_dtype=dtype, normalization="RMSNorm",
                               batch_p2p_comm=False)  # gloo has no batched send/recv
    from megatron.core import parallel_state as ps

    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=vocab, max_sequence_length=SEQ, position_embedding_type="rope",
                     pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                     share_embeddings_and_output_weights=False)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.1, bf16=bf16,
                                 use_distributed_optimizer=True, params_dtype=dtype)
    return model, get_megatron_optimizer(opt_config, [model])


def _batches(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    tokens = [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(n)]
    return [{"tokens": t, "labels": t.roll(-1, dims=1)} for t in tokens]


def _forward_step(data: Any, model: Any) -> tuple[torch.Tensor, Any]:
    batch = next(data)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    out = model(batch["tokens"], position_ids, None, labels=batch["labels"])

    def loss_func(losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = losses.float().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def _train(model: Any, optimizer: Any, steps: int) -> None:
    """A few real optimizer steps through Megatron's schedule (pipelined when pp > 1), two
    microbatches each."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    step_fn = get_forward_backward_func()
    for _ in range(steps):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        step_fn(forward_step_func=_forward_step, data_iterator=iter(_batches(2)), model=[model],
                num_microbatches=2, seq_length=SEQ, micro_batch_size=BATCH, forward_only=False)
        model.finish_grad_sync()
        optimizer.prepare_grads()
        optimizer.step_with_ready_grads()


def _run_values(iteration: int) -> dict[str, Any]:
    """What Megatron-LM's ``generate_state_dict`` adds to the saved state: its arguments (an
    ``argparse.Namespace`` holding Megatron enums and configs), the iteration, the format version."""
    import argparse

    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer.enums import AttnBackend

    args = argparse.Namespace(tensor_model_parallel_size=2, attention_backend=AttnBackend.auto,
                              num_attention_heads=MODEL["num_attention_heads"], group_query_attention=True,
                              num_query_groups=MODEL["num_query_groups"],
                              optimizer_config=OptimizerConfig(lr=1e-2), params_dtype=torch.bfloat16)
    return {"args": args, "iteration": iteration, "checkpoint_version": 3.0}


def train_and_save(rank: int, world_size: int, out: str, tp: int, pp: int, bf16: bool) -> str:
    """Every rank: build, train ``STEPS`` steps, save model + optimizer with ``dist_checkpointing``."""
    _setup(tp, pp, seed=1234)
    from megatron.core import dist_checkpointing

    model, optimizer = _build(tp, pp, bf16)
    _train(model, optimizer, STEPS)
    model_sd = model.module.sharded_state_dict(prefix="")
    state = {**model_sd, "optimizer": optimizer.sharded_state_dict(
        model_sd, metadata={"distrib_optim_sharding_type": "fully_reshardable"}), **_run_values(STEPS)}
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    torch.distributed.barrier()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Megatron's writer threads report through a Manager queue, a child process; ranks under
    # run_ranks are daemonic and may not start one, and a thread-safe queue serves threads alike
    filesystem_async._results_queue = queue.Queue()
    dist_checkpointing.save(state, out)
    return out


def load_full(rank: int, world_size: int, src: str, out: str, bf16: bool, vocab: int = VOCAB) -> dict[str, Any]:
    """One rank (tp=1, pp=1): Megatron's ``dist_checkpointing.load`` of ``src`` into the sharded state
    dict of a fresh tp=1 model and distributed optimizer: Megatron's own gather at tp=1.

    Writes ``out`` (safetensors): ``<name>/<state>`` for states ``param``, ``fp32``, ``exp_avg``,
    ``exp_avg_sq`` (tensors do not travel back through the result pipe); ``out.forward``: the
    loaded model's ``logits`` on fixed ``tokens``.

    Returns:
        ``groups``: name -> the index of its param group; ``param_groups``: their hyper-parameters.
    """
    _setup(1, 1, seed=99)  # another seed: nothing may survive from initialisation
    from megatron.core import dist_checkpointing

    model, optimizer = _build(1, 1, bf16, vocab)
    dist_opt = optimizer.chained_optimizers[0]
    # without Apex/TE a fresh optimizer has no states to describe; Megatron fills them with dummies
    dist_opt._init_optimizer_states_with_dummy_values()
    model_sd = model.module.sharded_state_dict(prefix="")
    state = {**model_sd, "optimizer": optimizer.sharded_state_dict(
        model_sd, is_loading=True, metadata={"distrib_optim_sharding_type": "fully_reshardable"})}
    loaded = dist_checkpointing.load(state, src)
    # the sharded state dict holds detached views of the parameters: matched by address
    name_of = {sh.data.data_ptr(): key for key, sh in model_sd.items()
               if isinstance(getattr(sh, "data", None), torch.Tensor)}
    # param_state is numbered in the order of the grad buffers' parameter maps (Megatron's own order)
    order = [name_of[p.data_ptr()] for buf in dist_opt.buffers for p in buf.param_index_map]
    params = {checkpoint_name(name, model_sd[name]): {"param": loaded[name]} for name in order}
    for idx, name in enumerate(order):
        for st, t in loaded["optimizer"]["param_state"][idx].items():
            params[checkpoint_name(name, model_sd[name])]["fp32" if st in ("param", "fp32_param") else st] = t
    named = dict(model.module.named_parameters())
    groups = {checkpoint_name(name, model_sd[name]): dist_opt.model_param_group_index_map[named[name]][0]
              for name in order}
    save_file({f"{n}/{st}": t.contiguous() for n, d in params.items() for st, t in d.items()}, out)
    save_file(_forward(model, {k: loaded[k] for k in model_sd}), out + ".forward")
    return {"groups": groups,
            "param_groups": loaded["optimizer"]["optimizer"]["param_groups"]}


def checkpoint_name(module_name: str, sharded: Any) -> str:
    """The name a parameter has in the checkpoint's own terms: its sharded key, with the layer number
    Megatron records as the offset along the stacked axis (``input_layernorm.weight`` is saved as
    ``self_attention.linear_qkv.layer_norm_weight``); the module name when nothing is stacked."""
    if not getattr(sharded, "prepend_axis_num", 0):
        return module_name
    head, _, rest = sharded.key.partition("layers.")
    return f"{head}layers.{sharded.global_offset[0]}.{rest}"


def _forward(model: Any, model_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tp=1 model with the loaded weights, run on fixed tokens: its logits."""
    model.module.load_state_dict(model_state)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    with torch.no_grad():
        logits = model.module(tokens, position_ids, None)
    return {"tokens": tokens, "logits": logits.float().contiguous()}


def load_and_resave(rank: int, world_size: int, src: str, out: str, tp: int, pp: int, bf16: bool,
                    vocab: int = VOCAB) -> None:
    """Every rank of a tp x pp job: Megatron's ``dist_checkpointing.load`` of ``src`` (model and
    distributed optimizer, ``fully_reshardable``) into a fresh model and optimizer, both loaded with
    their own ``load_state_dict``, then saved again with ``dist_checkpointing.save`` at ``out``:
    what this job holds, in Megatron's own words (no ucp code runs here)."""
    _setup(tp, pp, seed=77)  # another seed: nothing may survive from initialisation
    from megatron.core import dist_checkpointing

    model, optimizer = _build(tp, pp, bf16, vocab)
    optimizer.chained_optimizers[0]._init_optimizer_states_with_dummy_values()
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}
    model_sd = model.module.sharded_state_dict(prefix="")
    state = {**model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=meta)}
    loaded = dist_checkpointing.load(state, src)
    model.module.load_state_dict({k: loaded[k] for k in model_sd})
    _skip_missing_step()
    optimizer.load_state_dict(loaded["optimizer"])
    model_sd = model.module.sharded_state_dict(prefix="")
    again = {**model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, metadata=meta),
             "iteration": loaded.get("iteration")}
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    torch.distributed.barrier()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()  # as in train_and_save
    dist_checkpointing.save(again, out)


def _skip_missing_step() -> None:
    """Megatron-core 0.19 without Apex/TE: ``load_state_dict`` gives every parameter's torch Adam
    state a ``step`` tensor (from the param groups), then copies each state tensor from the loaded
    ones, which never hold ``step`` (``load_parameter_state_from_fully_reshardable`` skips it): a
    KeyError whatever the checkpoint. The copy is told to skip ``step`` (already set)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    copy = DistributedOptimizer._set_main_param_and_optimizer_states

    def skipping(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
        copy(self, model_param, {"step": None, **tensors})

    DistributedOptimizer._set_main_param_and_optimizer_states = skipping


def load_model_and_run(rank: int, world_size: int, src: str, out: str, tp: int, bf16: bool, pp: int = 1,
                       vocab: int = VOCAB, tokens_below: int = VOCAB,
                       shape: dict | None = None) -> dict[str, Any]:
    """Every rank of a tp x pp (x dp: the ranks left over) job: Megatron's ``dist_checkpointing.load``
    of the model alone (a pretrained start: no optimizer state) into a fresh model whose vocabulary
    has ``vocab`` rows, loaded with its ``load_state_dict``; runs it on fixed tokens (ids below
    ``tokens_below``; ``shape``: the model's TransformerConfig sizes, default :data:`MODEL`; stage by stage,
    the hidden states sent on to the next stage) and writes ``out.forward`` (the last stage's first
    rank: the logits, gathered over tp by Megatron), then saves the model again with
    ``dist_checkpointing.save`` at ``out`` (no ucp code runs here).

    Returns:
        where this rank's pieces landed: ``stage`` (its pipeline rank), ``layers`` (the global
        ``layer_number`` of each local layer, in order), ``norms`` (each local layer's
        ``input_layernorm.weight`` as a list), ``embedding`` / ``output_layer`` (whether the stage
        holds them) and ``vocab_rows`` (the rows of its shard of the embedding or output layer).
    """
    _setup(tp, pp, seed=77)
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model, _ = _build(tp, pp, bf16, vocab, shape)
    model_sd = model.module.sharded_state_dict(prefix="")
    loaded = dist_checkpointing.load(model_sd, src)
    model.module.load_state_dict({k: loaded[k] for k in model_sd})
    tokens = torch.randint(0, tokens_below, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(SEQ, BATCH, (shape or MODEL)["hidden_size"], dtype=dtype)
            torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.module.set_input_tensor(hidden)
        output = model.module(tokens, position_ids, None)
        if not ps.is_pipeline_last_stage():
            torch.distributed.send(output.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        else:
            logits = gather_from_tensor_model_parallel_region(output)
    first_of_last = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 \
        and ps.get_data_parallel_rank() == 0
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    torch.distributed.barrier()
    if first_of_last:
        save_file({"tokens": tokens, "logits": logits.float().contiguous()}, out + ".forward")
    torch.distributed.barrier()
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()  # as in train_and_save
    dist_checkpointing.save(model.module.sharded_state_dict(prefix=""), out)
    gpt = model.module
    vocab_layer = getattr(gpt, "embedding", None) or getattr(gpt, "output_layer", None)
    weight = vocab_layer.word_embeddings.weight if hasattr(vocab_layer, "word_embeddings") else \
        getattr(vocab_layer, "weight", None)
    return {"stage": ps.get_pipeline_model_parallel_rank(),
            "layers": [layer.layer_number for layer in gpt.decoder.layers],
            "norms": [layer.input_layernorm.weight.float().tolist() for layer in gpt.decoder.layers],
            "embedding": hasattr(gpt, "embedding"), "output_layer": hasattr(gpt, "output_layer"),
            "vocab_rows": None if weight is None else weight.shape[0]}
