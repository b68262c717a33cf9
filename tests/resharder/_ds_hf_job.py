"""A stock DeepSpeed job (no ucp import) that starts from a pretrained Hugging Face Llama.

Run under torchrun, one process per rank::

    python -m torch.distributed.run --nproc_per_node 2 ... tests/resharder/_ds_hf_job.py \
        HF_FOLDER DS_DIR SEEN.pt --stage 2

Builds ``transformers.LlamaForCausalLM`` from the folder's ``config.json`` with fresh random
weights, wraps it with ``deepspeed.initialize`` (fp32, ``torch.optim.AdamW``, ZeRO ``--stage``), loads
``DS_DIR`` with ``engine.load_checkpoint(DS_DIR, load_optimizer_states=False,
load_lr_scheduler_states=False)`` (a warm start: the fp32 masters come from the files, the optimizer
is the job's own, new), and rank 0 records what the engine holds: module weights, gathered fp32
masters, the logits of a fixed batch, the optimizer's state count and hyper-parameters; then every rank trains one step (the new optimizer works).

``--tp T`` (T > 1): AutoTP (``tensor_parallel.autotp_size`` = T) shards the model over T ranks (tp rank =
rank % T); every rank then records its own shards, to ``SEEN.pt.R`` (R: its rank), and the ranks of
one tp group train on the same batch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

assert "ucp" not in sys.modules


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("hf")
    p.add_argument("load")
    p.add_argument("record")
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--tp", type=int, default=1, help="AutoTP over this many ranks (1: none)")
    own = p.parse_args(argv)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(123)  # not the pretrained weights: they must come from the files
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(own.hf))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
              "zero_optimization": {"stage": own.stage}, "zero_allow_untested_optimizer": True}
    if own.tp > 1:
        config["tensor_parallel"] = {"autotp_size": own.tp}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    path, _ = engine.load_checkpoint(own.load, load_optimizer_states=False, load_lr_scheduler_states=False)
    assert path is not None, f"nothing loaded from {own.load}"
    seen = {"fp32": {}, "module": {}, "step": engine.global_steps,
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups],
            "opt_states": len(engine.optimizer.optimizer.state)}
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        for name, prm in engine.module.named_parameters():
            seen["module"][name] = prm.detach().clone()
        engine.module.eval()
        with torch.no_grad():
            seen["logits"] = engine.module(tokens).logits.clone()
    for name, prm in engine.module.named_parameters():
        seen["fp32"][name] = safe_get_full_fp32_param(prm).clone()
    seen["tokens"] = tokens
    engine.module.train()
    batch = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(rank // own.tp))
    loss = engine(batch[:, :-1], labels=batch[:, :-1]).loss
    engine.backward(loss)
    engine.step()
    seen["loss"] = loss.item()
    seen["opt_states_after_step"] = len(engine.optimizer.optimizer.state)
    if own.tp > 1:
        torch.save(seen, f"{own.record}.{rank}")
    elif rank == 0:
        torch.save(seen, own.record)
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/engines/_ds_train.py: skip gloo/shm destructors that may abort


if __name__ == "__main__":
    main(sys.argv[1:])
