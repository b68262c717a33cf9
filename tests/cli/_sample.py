"""Tiny models and states shared by the command-line tests (plain functions, no fixtures;
importable by rank processes too)."""

from __future__ import annotations

import re
import shutil
from collections import OrderedDict
from pathlib import Path

import torch

import ucp

VOCAB, POSITIONS, HIDDEN, LAYERS = 64, 8, 16, 2


def gpt2_state(seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """A GPT-2 (``GPT2LMHeadModel``) state dict in Hugging Face naming, random and tiny."""
    g = torch.Generator().manual_seed(seed)
    h = HIDDEN
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    sd["transformer.wte.weight"] = torch.randn(VOCAB, h, generator=g) * 0.1
    sd["transformer.wpe.weight"] = torch.randn(POSITIONS, h, generator=g) * 0.1
    for i in range(LAYERS):
        p = f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            sd[f"{p}.{ln}.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
            sd[f"{p}.{ln}.bias"] = 0.1 * torch.randn(h, generator=g)
        for mod, (fan_in, fan_out) in (("attn.c_attn", (h, 3 * h)), ("attn.c_proj", (h, h)),
                                       ("mlp.c_fc", (h, 4 * h)), ("mlp.c_proj", (4 * h, h))):
            sd[f"{p}.{mod}.weight"] = torch.randn(fan_in, fan_out, generator=g) * 0.1
            sd[f"{p}.{mod}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    sd["transformer.ln_f.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    sd["transformer.ln_f.bias"] = 0.1 * torch.randn(h, generator=g)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # tied, as GPT-2 saves it
    return sd


def gpt2_config() -> dict:
    """A config.json for ``transformers.GPT2LMHeadModel`` of :func:`gpt2_state`'s sizes."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB,
            "n_positions": POSITIONS, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": 2,
            "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.0,
            "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5,
            "bos_token_id": 0, "eos_token_id": 0, "tie_word_embeddings": True,
            "torch_dtype": "float32"}


def training_state(model: dict[str, torch.Tensor], seed: int = 1) -> dict:
    """``{"model": ..., "optim": ...}`` with AdamW-like state, as get_state_dict gives it."""
    g = torch.Generator().manual_seed(seed)
    state = {n: {"step": torch.tensor(200.0), "exp_avg": torch.randn(t.shape, generator=g) * 1e-3,
                 "exp_avg_sq": torch.rand(t.shape, generator=g) * 1e-6} for n, t in model.items()}
    groups = [{"params": list(model), "lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}]
    return {"model": dict(model), "optim": {"state": state, "param_groups": groups}}


def save_native(root: Path, model: dict[str, torch.Tensor], steps=(100, 200), **kw) -> Path:
    for step in steps:
        ucp.save(training_state(model), str(root), step=step, **kw).wait()
    return root


def add_uncommitted(root: Path, step: int) -> None:
    """A step directory with rank files but no manifest, as a crash mid-save leaves it."""
    newest = sorted(p for p in root.iterdir() if p.name.startswith("step-"))[-1]
    shutil.copytree(newest, root / f"step-{step:08d}", ignore=shutil.ignore_patterns("manifest.json"))


SMALL_CONSTANTS = {"vocab": VOCAB, "positions": POSITIONS, "hidden": HIDDEN, "num_layers": LAYERS,
                   "pad_multiple": 4}


def small_gpt2_spec() -> str:
    """The bundled GPT-2 spec with these sizes written into its text."""
    from ucp.grammar import bundled_spec_text

    text = bundled_spec_text("gpt2")
    for name, value in SMALL_CONSTANTS.items():
        text, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", text, flags=re.M)
        assert n == 1, name
    return text


#: Megatron-style module names for GPT-2 (Linear weights stored [out, in], i.e. transposed
#: Hugging Face Conv1D weights), as renames in a UCL spec.
RENAME_SPEC = """\
ucl 1
param "transformer.wte.weight"  engine "embedding.word_embeddings.weight"
param "transformer.wpe.weight"  engine "embedding.position_embeddings.weight"
param "transformer.h.{i}.ln_1.{p:*}"  engine "layers.{i}.input_layernorm.{p:*}"
param "transformer.h.{i}.ln_2.{p:*}"  engine "layers.{i}.post_attention_layernorm.{p:*}"
param "transformer.h.{i}.attn.c_attn.weight"  engine "layers.{i}.attention.qkv.weight"  transpose
param "transformer.h.{i}.attn.c_attn.bias"  engine "layers.{i}.attention.qkv.bias"
param "transformer.h.{i}.attn.c_proj.weight"  engine "layers.{i}.attention.dense.weight"  transpose
param "transformer.h.{i}.attn.c_proj.bias"  engine "layers.{i}.attention.dense.bias"
param "transformer.h.{i}.mlp.c_fc.weight"  engine "layers.{i}.mlp.fc1.weight"  transpose
param "transformer.h.{i}.mlp.c_fc.bias"  engine "layers.{i}.mlp.fc1.bias"
param "transformer.h.{i}.mlp.c_proj.weight"  engine "layers.{i}.mlp.fc2.weight"  transpose
param "transformer.h.{i}.mlp.c_proj.bias"  engine "layers.{i}.mlp.fc2.bias"
param "transformer.ln_f.{p:*}"  engine "final_layernorm.{p:*}"
param "lm_head.weight"  engine "output_layer.weight"
"""
_ENGINE_NAMES = [("transformer.wte.", "embedding.word_embeddings."),
                 ("transformer.wpe.", "embedding.position_embeddings."),
                 (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                 (".attn.c_attn.", ".attention.qkv."), (".attn.c_proj.", ".attention.dense."),
                 (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
                 ("transformer.ln_f.", "final_layernorm."), ("transformer.h.", "layers."),
                 ("lm_head.", "output_layer.")]


def engine_state(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``hf`` under the engine names of :data:`RENAME_SPEC`, Conv1D weights transposed
    (written out by hand, independently of the spec)."""
    out = {}
    for name, t in hf.items():
        new = name
        for a, b in _ENGINE_NAMES:
            new = new.replace(a, b)
        transposed = name.endswith(".weight") and t.dim() == 2 and ".h." in name and "ln_" not in name
        out[new] = t.t().contiguous() if transposed else t
    return out
