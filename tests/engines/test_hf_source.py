"""A Hugging Face safetensors model is a source engine: it converts, and reshards to a DCP
checkpoint that torch's own dcp.load reads into the same transformers model."""

from __future__ import annotations

import pytest
import torch

import ucp


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny transformers Llama saved by save_pretrained in two safetensors shards + index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path, model


def test_detected_and_converted_weight_for_weight(hf_model, tmp_path):
    path, model = hf_model
    from ucp.engines._registry import detect_engine

    engine, found = detect_engine(str(path))
    assert engine.name == "hf" and "safetensors" in found
    u = ucp.convert(str(path), str(tmp_path / "u"), progress=False)
    want = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    assert sorted(u.names()) == sorted(want)
    for name, t in want.items():
        assert u.info(name).states == ("param",) or "fp32" in u.info(name).states
        assert torch.equal(u.read(name, "param"), t), name
    assert u.param_groups == []


def test_a_region_reads_only_its_rows(hf_model):
    from ucp.engines.hf import ENGINE
    from ucp.storage import read_counter

    path, model = hf_model
    src = ENGINE.open(str(path))
    name = "model.embed_tokens.weight"  # 96 x 64 fp32: 256 bytes a row
    before = read_counter()
    part = src.read(name, "param", ((10, 20), (8, 40)))
    assert (read_counter() - before).bytes == 10 * 64 * 4
    assert torch.equal(part, model.state_dict()[name][10:20, 8:40])


def test_reshard_to_dcp_loads_into_the_same_model(hf_model, tmp_path):
    """HF -> DCP (the migration matrix's Hugging Face source): dcp.load into a fresh model gives
    the same weights and logits."""
    import torch.distributed.checkpoint as dcp
    from transformers import LlamaForCausalLM

    path, model = hf_model
    ucp.reshard(str(path), str(tmp_path / "dcp"), topology="dp=2", engine="dcp", progress=False)
    fresh = LlamaForCausalLM(model.config).eval()
    msd = {k: v for k, v in fresh.state_dict().items() if "rotary" not in k}
    state = {"model": msd}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"),
             planner=dcp.DefaultLoadPlanner(allow_partial_load=True))  # no optimizer in the source
    fresh.load_state_dict(state["model"], strict=False)
    for name, t in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_a_native_step_directory_is_not_taken_for_a_model(tmp_path):
    from ucp.engines.hf import ENGINE

    ucp.save({"model": {"w": torch.ones(2)}}, str(tmp_path / "n"), step=1).wait()
    step = next((tmp_path / "n").glob("step-*"))
    assert ENGINE.detect(str(step)) is None
