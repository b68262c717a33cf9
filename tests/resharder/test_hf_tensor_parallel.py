"""A pretrained Hugging Face model as the start of a tensor-parallel run (issue 15).

A tiny transformers Llama saved by ``save_pretrained`` (weights only, several safetensors shards +
index) -> ``ucp reshard hf/ out --to tp=..,dp=.. --engine deepspeed|dcp`` -> a stock job with no ucp
import loads ``out`` with the framework's own loader:

* DeepSpeed AutoTP (``tests/resharder/_ds_hf_job.py --tp 2``, 4 ranks, ZeRO-1, 6 heads / 3 kv heads:
  DeepSpeed's uneven 2 + 1 kv-head split), and DeepSpeed ZeRO-3 on 2 ranks (no tp);
* torch DCP into transformers' Llama on a 2-D (dp x tp) mesh: ``parallelize_module`` and
  ``fully_shard`` (``tests/resharder/_dcp_hf_tp_job.py``).

Every rank's weights (its tp shard, or the full tensor) equal the folder's, cut as the framework cuts
them, bit for bit; the logits equal transformers' on the folder within fp32 rounding (tensor
parallelism sums the row-parallel products in another order, so they are not bit-equal); one
training step with the job's own new optimizer runs.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from ucp.testing import run_command, scaled_timeout

HERE = Path(__file__).resolve().parent


def _native_tp():
    """tests/resharder/test_deepspeed_native_tp.py (AutoTP's cutting rules, free_port), under a name of its own."""
    name = "ucp_tests_native_tp_for_hf"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "test_deepspeed_native_tp.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


_tp = _native_tp()


def _hf(path: Path, heads: int, kv_heads: int) -> tuple[Path, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=8 * heads, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path, model


def _reshard(src: Path, out: Path, *args: str) -> None:
    from click.testing import CliRunner

    from ucp.cli import main

    got = CliRunner().invoke(main, ["reshard", str(src), str(out), *args, "-q"])
    assert got.exit_code == 0, got.output


def _torchrun(ranks: int, script: str, *args: str, what: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(_tp._engines.free_port()), str(HERE / script), *args]
    run_command(cmd, what=what, timeout=scaled_timeout(400))


def _close_logits(hf, seen: dict) -> None:
    with torch.no_grad():
        want = hf(seen["tokens"]).logits
    torch.testing.assert_close(seen["logits"], want)  # fp32 defaults: rtol 1.3e-6, atol 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tp, dp, zero", [(2, 2, 1), (1, 2, 1), (1, 2, 3)])
def test_hugging_face_model_to_a_stock_deepspeed_job(tmp_path, tp, dp, zero):
    """``ucp reshard hf/ out --to tp=2,dp=2,zero=1 --engine deepspeed --config hf/config.json`` -> a stock
    AutoTP job on 4 ranks loads it (``load_optimizer_states=False, load_lr_scheduler_states=False``): each
    rank's weights and fp32 masters equal the folder's cut by DeepSpeed's uneven kv-head split (tp rank 0:
    2 kv heads, rank 1: 1) bit for bit. Also ZeRO-1 and ZeRO-3 on 2 ranks (no tp): the gathered weights and fp32
    masters equal the folder's. Both: transformers' logits, step 0, no optimizer state until one step."""
    pytest.importorskip("deepspeed", reason="install DeepSpeed 0.19.8 to run the real-engine tests")
    from transformers import LlamaForCausalLM

    hf, _ = _hf(tmp_path / "hf", 6, 3)
    out = tmp_path / "ds"
    config = ["--config", str(hf / "config.json")] if tp > 1 else []
    _reshard(hf, out, "--to", f"tp={tp},dp={dp},zero={zero}", "--engine", "deepspeed", *config)
    record = tmp_path / "seen.pt"
    _torchrun(tp * dp, "_ds_hf_job.py", str(hf), str(out), str(record), "--stage", str(zero), "--tp", str(tp),
              what=f"DeepSpeed job (tp={tp}, dp={dp}, ZeRO-{zero}) starting from a Hugging Face model")
    model = LlamaForCausalLM.from_pretrained(hf).eval()
    want = model.state_dict()
    seen_all = ([torch.load(f"{record}.{r}", weights_only=True) for r in range(tp * dp)] if tp > 1
                else [torch.load(record, weights_only=True)])
    k = "model.layers.0.self_attn.k_proj.weight"
    if tp > 1:
        assert [s["module"][k].shape[0] for s in seen_all[:2]] == [16, 8]  # 2 + 1 kv heads of 8 rows
    for rank, seen in enumerate(seen_all):
        assert set(seen["module"]) == set(want), rank
        for name, got in seen["module"].items():
            shard = _tp._shard(want[name], name, tp, rank % tp, _tp._heads(3)) if tp > 1 else want[name]
            _tp._assert_same(shard, got, f"rank {rank} {name}")
            _tp._assert_same(shard.float(), seen["fp32"][name], f"rank {rank} {name}/fp32")
        _close_logits(model, seen)
        assert seen["step"] == 0 and seen["opt_states"] == 0 and seen["opt_states_after_step"] > 0
        assert [(g["lr"], g["weight_decay"]) for g in seen["groups"]] == [(1e-3, 0.1)]  # the job's own
        assert math.isfinite(seen["loss"])
    if tp > 1:  # the two dp replicas of a tp rank trained on different batches
        assert seen_all[0]["loss"] == seen_all[1]["loss"] != seen_all[2]["loss"]


@pytest.mark.slow
def test_hugging_face_model_to_fsdp2_and_tensor_parallel_via_dcp(tmp_path):
    """``ucp reshard hf/ out --to tp=2,dp=2 --engine dcp --spec llama_hf`` -> a torch job on 4 ranks (no ucp
    import): transformers' Llama on a 2-D (dp x tp) gloo mesh, ``parallelize_module`` (ColwiseParallel
    q/k/v/gate/up, RowwiseParallel o/down) inside ``fully_shard`` over dp, loaded by ``dcp.load`` into
    ``get_model_state_dict`` and ``set_model_state_dict``: every parameter's ``full_tensor`` equals the
    folder's bit for bit on every rank, the local shards are 2-D cuts, the logits equal transformers'
    and a step trains."""
    from transformers import LlamaForCausalLM

    hf, _ = _hf(tmp_path / "hf", 4, 2)
    out = tmp_path / "dcp"
    _reshard(hf, out, "--to", "tp=2,dp=2", "--engine", "dcp", "--spec", "llama_hf")  # the bundled spec
    record = tmp_path / "seen.pt"
    _torchrun(4, "_dcp_hf_tp_job.py", str(hf), str(out), str(record), "--tp", "2",
              what="torch job (FSDP2 x tensor parallel) starting from a Hugging Face model")
    model = LlamaForCausalLM.from_pretrained(hf).eval()
    want = model.state_dict()
    seen_all = [torch.load(f"{record}.{r}", weights_only=True) for r in range(4)]
    for rank, seen in enumerate(seen_all):
        assert set(seen["full"]) == set(want), rank
        for name, got in seen["full"].items():
            _tp._assert_same(want[name], got, f"rank {rank} {name}")
        _close_logits(model, seen)
        assert math.isfinite(seen["loss"])
    local = seen_all[0]["local_shape"]
    assert local["model.layers.0.self_attn.k_proj.weight"] == (4, 32)  # 16 rows / tp 2 / dp 2
    assert local["model.layers.0.mlp.down_proj.weight"] == (16, 32)  # 64 columns / tp 2, then rows / dp 2
    assert seen_all[0]["loss"] == seen_all[1]["loss"] != seen_all[2]["loss"]  # one batch per tp group
