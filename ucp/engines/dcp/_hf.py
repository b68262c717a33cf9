"""torchtitan Llama names and layouts -> Hugging Face Llama names and layouts, for ``ucp export``.

``ucp export --map torchtitan-llama --config config.json`` (the map is one of the bundled
``MAPS`` that ``ucp.engines.megatron.HfView`` applies). A torchtitan Llama converts under its own
names; the Hugging Face layout is chosen at export:

| torchtitan | Hugging Face Llama |
| --- | --- |
| ``tok_embeddings.weight`` | ``model.embed_tokens.weight`` |
| ``layers.{i}.attention[.qkv_linear].wq.weight`` | ``model.layers.{i}.self_attn.q_proj.weight``, rows permuted per head |
| ``layers.{i}.attention[.qkv_linear].wk.weight`` | ``...k_proj.weight``, rows permuted per KV head |
| ``layers.{i}.attention[.qkv_linear].wv.weight`` / ``attention.wo.weight`` | ``...v_proj.weight`` / ``...o_proj.weight`` |
| ``layers.{i}.feed_forward.w1`` / ``w3`` / ``w2`` ``.weight`` | ``mlp.gate_proj`` / ``up_proj`` / ``down_proj`` ``.weight`` |
| ``layers.{i}.attention_norm.weight`` / ``ffn_norm.weight`` | ``input_layernorm.weight`` / ``post_attention_layernorm.weight`` |
| ``norm.weight`` / ``lm_head.weight`` (``output.weight`` before torchtitan 0.3) | ``model.norm.weight`` / ``lm_head.weight`` |

The permutation: torchtitan rotates each head's features as adjacent pairs ``(0, 1), (2, 3), ...``
(complex RoPE), Hugging Face rotates the two halves ``(j, j + head_dim / 2)`` (``rotate_half``).
So within each head, Hugging Face's row ``c * head_dim / 2 + j`` is torchtitan's row ``2 j + c``.
The head counts (``num_attention_heads``, ``num_key_value_heads``) and ``head_dim`` (or
``hidden_size / num_attention_heads``) come from the Hugging Face ``config.json``: the checkpoint
records neither.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

from ucp.core import ConvertError

__all__ = ["titan_llama_rules"]

Piece = Callable[[torch.Tensor], torch.Tensor]
_L = r"layers\.(\d+)\."
_HF = "model.layers.{0}."


def _heads(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(query heads, KV heads, head_dim)`` from a Hugging Face Llama config."""
    missing = [k for k in ("num_attention_heads", "hidden_size") if not isinstance(config.get(k), int)]
    if missing:
        raise ConvertError(f"the Hugging Face config has no {' or '.join(missing)} (an integer); the "
                           "torchtitan-llama map needs the head counts to reorder the query and key rows "
                           "per head: pass the model's config.json")
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    if head_dim % 2:
        raise ConvertError(f"the Hugging Face config gives head_dim = {head_dim}, an odd number; rotary "
                           "embeddings rotate pairs of features: check the config's head_dim, "
                           "hidden_size and num_attention_heads")
    return heads, kv, head_dim


def rotate_half_rows(heads: int, head_dim: int, what: str) -> Piece:
    """torchtitan's interleaved rows of ``heads`` heads -> Hugging Face's rotate-half order."""
    def permute(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] != heads * head_dim:
            raise ConvertError(f"a torchtitan {what} tensor has {t.shape[0]} rows, but the Hugging Face "
                               f"config gives {heads} heads x head_dim {head_dim} = {heads * head_dim}; "
                               "pass the config.json of this model")
        rest = tuple(t.shape[1:])
        return t.reshape(heads, head_dim // 2, 2, *rest).transpose(1, 2).reshape(t.shape)
    return permute


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def titan_llama_rules(config: Mapping[str, Any]) -> list[tuple[re.Pattern[str], list[tuple[str, Piece]]]]:
    """The torchtitan Llama -> Hugging Face Llama rules, in ``HfView``'s form: a name pattern, then
    (HF name, piece) pairs (``{0}`` in a HF name is the layer number)."""
    heads, kv, head_dim = _heads(config)
    attn, mlp, qkv = _HF + "self_attn.", _HF + "mlp.", _L + r"attention\.(?:qkv_linear\.)?"

    def one(pattern: str, hf: str, piece: Piece = _whole) -> tuple[re.Pattern[str], list[tuple[str, Piece]]]:
        return re.compile(pattern), [(hf, piece)]

    return [
        one(r"tok_embeddings\.weight", "model.embed_tokens.weight"),
        one(qkv + r"wq\.weight", attn + "q_proj.weight", rotate_half_rows(heads, head_dim, "wq")),
        one(qkv + r"wk\.weight", attn + "k_proj.weight", rotate_half_rows(kv, head_dim, "wk")),
        one(qkv + r"wv\.weight", attn + "v_proj.weight"),
        one(_L + r"attention\.wo\.weight", attn + "o_proj.weight"),
        one(_L + r"feed_forward\.w1\.weight", mlp + "gate_proj.weight"),
        one(_L + r"feed_forward\.w3\.weight", mlp + "up_proj.weight"),
        one(_L + r"feed_forward\.w2\.weight", mlp + "down_proj.weight"),
        one(_L + r"attention_norm\.weight", _HF + "input_layernorm.weight"),
        one(_L + r"ffn_norm\.weight", _HF + "post_attention_layernorm.weight"),
        one(r"norm\.weight", "model.norm.weight"),
        one(r"(?:lm_head|output)\.weight", "lm_head.weight"),
    ]
