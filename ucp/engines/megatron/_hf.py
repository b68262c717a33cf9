"""Megatron-core GPT names and tp=1 layouts -> Hugging Face Llama names and layouts, for ``ucp export``.

A converted Megatron checkpoint keeps Megatron's own names and fused layouts (``_layout``); the
Hugging Face layout is chosen explicitly at export (``ucp export --map megatron-llama``), so
nothing is reordered silently. One Megatron tensor may give several Hugging Face tensors:

| Megatron (tp=1) | Hugging Face Llama |
| --- | --- |
| ``embedding.word_embeddings.weight`` | ``model.embed_tokens.weight`` (vocabulary padding cut to ``vocab_size``) |
| ``decoder.layers.{i}.self_attention.linear_qkv.weight`` (and ``.bias``) | ``q_proj``, ``k_proj``, ``v_proj``: rows per query group ``[q.., k, v]`` gathered |
| ``...linear_qkv.layer_norm_weight`` / ``input_layernorm.weight`` | ``model.layers.{i}.input_layernorm.weight`` |
| ``...linear_proj.weight`` | ``o_proj.weight`` |
| ``...mlp.linear_fc1.layer_norm_weight`` / ``pre_mlp_layernorm.weight`` | ``post_attention_layernorm.weight`` |
| ``...mlp.linear_fc1.weight`` ``[gate; up]`` | ``gate_proj.weight``, ``up_proj.weight`` |
| ``...mlp.linear_fc2.weight`` | ``down_proj.weight`` |
| ``decoder.final_layernorm.weight`` / ``output_layer.weight`` | ``model.norm.weight`` / ``lm_head.weight`` |

The head counts come from the Hugging Face ``config.json`` given to the export.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

from ucp.core import ConvertError
from .._base import ParamInfo, Region, cut
from ..dcp._hf import titan_llama_rules

__all__ = ["MAPS", "HfView"]

Piece = Callable[[torch.Tensor], torch.Tensor]
_L = r"decoder\.layers\.(\d+)\."
_HF = "model.layers.{0}."


def _qkv(config: Mapping[str, Any]) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
    """Pieces of a fused QKV tensor: per query group ``[q x (heads / groups), k, v]`` rows."""
    heads, groups = int(config["num_attention_heads"]), int(config.get("num_key_value_heads") or
                                                            config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    per = heads // groups

    def part(start: int, rows: int) -> Piece:
        def take(t: torch.Tensor) -> torch.Tensor:
            grouped = t.reshape(groups, (per + 2) * head_dim, *t.shape[1:])
            return grouped[:, start * head_dim:(start + rows) * head_dim].reshape(-1, *t.shape[1:])
        return take

    return [("q_proj", part(0, per)), ("k_proj", part(per, 1)), ("v_proj", part(per + 1, 1))]


def _vocab(config: Mapping[str, Any]) -> Piece:
    vocab = config.get("vocab_size")
    return lambda t: t if vocab is None else t[:int(vocab)]


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def llama_rules(config: Mapping[str, Any]) -> list[tuple[re.Pattern[str], list[tuple[str, Piece]]]]:
    """The Megatron GPT -> Hugging Face Llama rules: a name pattern, then (HF name, piece) pairs
    (``{0}``, ``{1}`` in a HF name are the pattern's groups: the layer number, ...)."""
    missing = [k for k in ("num_attention_heads", "hidden_size") if not isinstance(config.get(k), int)]
    if missing:
        raise ConvertError(f"the Hugging Face config has no {' or '.join(missing)} (an integer); the map "
                           "needs the head counts to split the fused QKV tensors: pass the model's config.json")
    attn, mlp = _HF + "self_attn.", _HF + "mlp."
    gate_up: list[tuple[str, Piece]] = [(mlp + "gate_proj.weight", lambda t: t.chunk(2)[0]),
                                        (mlp + "up_proj.weight", lambda t: t.chunk(2)[1])]
    return [
        (re.compile(r"embedding\.word_embeddings\.weight"), [("model.embed_tokens.weight", _vocab(config))]),
        (re.compile(_L + r"self_attention\.linear_qkv\.(weight|bias)"),
         [(attn + f"{proj}.{{1}}", piece) for proj, piece in _qkv(config)]),
        (re.compile(_L + r"(self_attention\.linear_qkv\.layer_norm_weight|input_layernorm\.weight)"),
         [(_HF + "input_layernorm.weight", _whole)]),
        (re.compile(_L + r"self_attention\.linear_proj\.weight"), [(attn + "o_proj.weight", _whole)]),
        (re.compile(_L + r"(mlp\.linear_fc1\.layer_norm_weight|pre_mlp_layernorm\.weight)"),
         [(_HF + "post_attention_layernorm.weight", _whole)]),
        (re.compile(_L + r"mlp\.linear_fc1\.weight"), gate_up),
        (re.compile(_L + r"mlp\.linear_fc2\.weight"), [(mlp + "down_proj.weight", _whole)]),
        (re.compile(r"decoder\.final_layernorm\.weight"), [("model.norm.weight", _whole)]),
        (re.compile(r"output_layer\.weight"), [("lm_head.weight", _vocab(config))]),
    ]


#: Bundled maps for ``ucp export --map`` (``torchtitan-llama``: ``ucp.engines.dcp._hf``).
MAPS = {"megatron-llama": llama_rules, "torchtitan-llama": titan_llama_rules}


class HfView:
    """A checkpoint's parameters under Hugging Face names, each read from its engine tensor.

    Args:
        source: what ``ucp export`` opened (``names``, ``info``, ``read``, ``buffer_names``,
            ``read_buffer``, ``param_groups``).
        rules: a map's rules (:data:`MAPS`).

    Raises:
        ConvertError: a parameter the map has no rule for (nothing is dropped silently).
    """

    engine = "hf-map"

    def __init__(self, source: Any, rules: list[tuple[re.Pattern[str], list[tuple[str, Piece]]]]) -> None:
        self.source = source
        self._pieces: dict[str, tuple[str, Piece]] = {}
        self._infos: dict[str, ParamInfo] = {}
        for name in source.names():
            found = next(((m, pieces) for pattern, pieces in rules if (m := pattern.fullmatch(name))), None)
            if found is None:
                raise ConvertError(f"{name!r} has no Hugging Face name in this map; export without "
                                   "--map to keep the checkpoint's names")
            m, pieces = found
            info = source.info(name)
            empty = torch.empty(info.shape, dtype=info.dtype, device="meta")  # shapes without data
            for template, piece in pieces:
                out = template.format(*m.groups())
                self._pieces[out] = (name, piece)
                self._infos[out] = ParamInfo(tuple(piece(empty).shape), info.dtype, info.states,
                                             info.frozen, info.group)

    def names(self) -> list[str]:
        return list(self._pieces)

    def info(self, name: str) -> ParamInfo:
        return self._infos[name]

    def read(self, name: str, state: str = "fp32", region: Region | None = None) -> torch.Tensor:
        src, piece = self._pieces[name]
        return cut(piece(self.source.read(src, state)), region).contiguous()

    def buffers(self) -> dict[str, torch.Tensor]:
        """The source's buffers under their own names (a map renames parameters only)."""
        return {n: self.source.read_buffer(n) for n in self.source.buffer_names()}

    def param_groups(self) -> list[dict[str, Any]]:
        return self.source.param_groups()


# -- the map read in reverse: Hugging Face Llama -> Megatron tp=1 (``ucp reshard --engine megatron``) --

#: HF name (per layer, after ``model.layers.{i}.``) -> the Megatron name (after ``decoder.layers.{i}.``)
#: of a tensor both keep whole.
_HF_WHOLE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_HF_TOP = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
           "model.norm.weight": "decoder.final_layernorm.weight", "lm_head.weight": "output_layer.weight"}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Megatron's fused QKV rows from Hugging Face's q/k/v: per query group ``[q.., k, v]``
    (the inverse of the export map's split)."""
    parts = [t.reshape(groups, t.shape[0] // groups, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


class MegatronFromHf:
    """A Hugging Face Llama model's tensors under Megatron's tp=1 names and fused layouts, each read
    from its Hugging Face tensors (``megatron-llama`` read in reverse; weights only).

    Args:
        source: an array source over the safetensors model (``names``, ``info``, ``read``).
        config: the model's ``config.json`` (the query-group count orders the fused QKV rows).

    Raises:
        ConvertError: a tensor the map has no Megatron name for, or a layer missing one of q/k/v or
            gate/up (nothing is dropped or made up).
    """

    def __init__(self, source: Any, config: Mapping[str, Any]) -> None:
        missing = [k for k in ("num_attention_heads", "hidden_size") if not isinstance(config.get(k), int)]
        if missing:
            raise ConvertError(f"{source.url}/config.json has no {' or '.join(missing)} (an integer); "
                               "fusing q/k/v into Megatron's QKV needs the head counts")
        self.source, self.url, self.step, self.config = source, source.url, None, dict(config)
        self.topology = None
        self.groups = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        self._parts: dict[str, tuple[str, ...]] = {}
        for name in source.names():
            self._place(name)
        for name, parts in self._parts.items():
            if "" in parts:
                raise ConvertError(f"{source.url}: Megatron's {name!r} fuses {len(parts)} Hugging Face "
                                   f"tensors and only {sum(1 for p in parts if p)} are in the model")
        infos = {n: source.info(n) for n in source.names()}
        # the model weights: ``param``, or the fp32 masters of a save that keeps no other copy
        # (an FSDP2 / DCP save of an fp32 model)
        self._state = {n: "param" if "param" in i.states or "fp32" not in i.states else "fp32"
                       for n, i in infos.items()}
        self._infos = {}
        for name, parts in self._parts.items():
            first = infos[parts[0]]
            rows = sum(infos[p].shape[0] for p in parts)
            dtype = first.dtype if self._state[parts[0]] == "param" else torch.float32
            self._infos[name] = ParamInfo((rows, *first.shape[1:]), dtype, ("param",), False, None)

    def _place(self, hf: str) -> None:
        if hf in _HF_TOP:
            self._parts[_HF_TOP[hf]] = (hf,)
            return
        m = _HF_LAYER.fullmatch(hf)
        rest = m.group(2) if m else ""
        pre = f"decoder.layers.{m.group(1)}." if m else ""
        attn = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        mlp = re.fullmatch(r"mlp\.(gate|up)_proj\.weight", rest)
        if m and rest in _HF_WHOLE:
            self._parts[pre + _HF_WHOLE[rest]] = (hf,)
        elif attn:
            name = pre + f"self_attention.linear_qkv.{attn.group(2)}"
            parts = list(self._parts.get(name, ("", "", "")))
            parts["qkv".index(attn.group(1))] = hf
            self._parts[name] = tuple(parts)
        elif mlp:
            name = pre + "mlp.linear_fc1.weight"
            parts = list(self._parts.get(name, ("", "")))
            parts[("gate", "up").index(mlp.group(1))] = hf
            self._parts[name] = tuple(parts)
        else:
            raise ConvertError(f"{self.source.url}: {hf!r} has no Megatron name in the megatron-llama map "
                               "(it places Llama's embeddings, attention, MLP and norms only)")

    def names(self) -> list[str]:
        return list(self._parts)

    def info(self, name: str) -> ParamInfo:
        return self._infos[name]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return []

    def buffer_names(self) -> list[str]:
        return []

    def read(self, name: str, state: str | None = "param", region: Region | None = None) -> torch.Tensor:
        parts = [self.source.read(p, self._state[p], None) for p in self._parts[name]]
        if len(parts) == 3:
            whole = fuse_qkv(*parts, groups=self.groups)
        else:
            whole = torch.cat(parts) if len(parts) > 1 else parts[0]
        return cut(whole, region).contiguous()
