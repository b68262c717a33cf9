"""Megatron-core ``dist_checkpointing`` (torch_dist) checkpoints convert without a spec.

The slow tests train a tiny GPTModel with real Megatron-core 0.19 on CPU/gloo (tp=2 x pp=2 on 4
ranks, distributed Adam, bf16 with fp32 masters), save it with ``dist_checkpointing.save``, and compare what
``ucp convert`` makes of it with what Megatron itself loads at tp=1 (``dist_checkpointing.load``
into a tp=1 model and optimizer): every tensor, bit for bit. The fast tests check the layout rules
and errors on hand-made metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

import ucp
from ucp.engines.dcp import DcpFiles, DcpMetadata, TensorEntry
from ucp.engines.dcp._meta import Chunk, parse_metadata
from ucp.engines.megatron import MegatronCheckpoint
from ucp.engines.megatron._layout import plan_layout, stacked_axis, ucp_name
from ucp.engines.megatron._common import load_common
from ucp.engines.megatron._reader import _step, default_groups
from ucp.engines._base import ParamInfo
from ucp.ops._export import export_hf
from safetensors.torch import save_file
from ucp.testing import run_ranks
from click.testing import CliRunner
from ucp.cli import main

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _megatron_make as make  # noqa: E402 - the rank functions live beside the tests


@dataclasses.dataclass
class Reference:
    ckpt: Path
    tensors: dict[str, torch.Tensor]  # "<name>/<state>", as Megatron loads them at tp=1
    groups: dict[str, int]
    param_groups: list[dict]
    forward: dict[str, torch.Tensor]  # the tp=1 model's "logits" on "tokens"


@pytest.fixture(scope="session")
def megatron_ckpt(tmp_path_factory) -> Reference:
    """A real Megatron-core checkpoint (tp=2 x pp=2, 2 steps) and Megatron's own tp=1, pp=1 load of
    it; made once per session."""
    pytest.importorskip("megatron.core", reason="pip install --ignore-requires-python megatron-core==0.19.2")
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("megatron")
    ckpt, ref = root / "iter_0000002", root / "tp1.safetensors"
    run_ranks(make.train_and_save, 4, args=(str(ckpt), 2, 2, True), timeout=300)
    (got,) = run_ranks(make.load_full, 1, args=(str(ckpt), str(ref), True), timeout=300)
    return Reference(ckpt, load_file(ref), got.value["groups"], got.value["param_groups"],
                     load_file(f"{ref}.forward"))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bytes(a.contiguous().view(torch.uint8).numpy()) \
        == bytes(b.contiguous().view(torch.uint8).numpy())


def _plain(groups: list[dict]) -> list[dict]:
    return json.loads(json.dumps(groups))  # tuples (betas) as lists, as any JSON store keeps them


@pytest.mark.slow
def test_convert_equals_megatron_tp1_load(megatron_ckpt: Reference, tmp_path):
    """Plain `ucp convert` (auto-detect, no spec): every state of every parameter under Megatron's
    tp=1 names, bit for bit what Megatron loads at tp=1; step and param groups included."""
    from click.testing import CliRunner
    from ucp.cli import main

    r = CliRunner().invoke(main, ["convert", str(megatron_ckpt.ckpt), str(tmp_path / "u")])
    assert r.exit_code == 0, r.output
    assert "found megatron" in r.output
    qkv = DcpFiles(str(megatron_ckpt.ckpt)).metadata.tensors["decoder.layers.self_attention.linear_qkv.weight"]
    assert len(qkv.chunks) == 4 * 2 and qkv.shape[0] == 4  # 4 layers over 2 stages, each cut in 2 by TP
    u = ucp.open(str(tmp_path / "u"))
    names = {k.rsplit("/", 1)[0] for k in megatron_ckpt.tensors}
    assert set(u.names()) == names and len(names) == 4 * 6 + 3
    for key, want in megatron_ckpt.tensors.items():
        name, state = key.rsplit("/", 1)
        assert _same(u.read(name, state=state), want), key
    assert all({"fp32", "exp_avg", "exp_avg_sq"} <= set(u.info(n).states) for n in names)
    assert u.step == make.STEPS  # Megatron-LM's iteration, from a common state holding its args
    assert _plain(u.param_groups) == _plain(megatron_ckpt.param_groups)
    assert {n: u.info(n).group for n in names} == megatron_ckpt.groups


@pytest.mark.slow
def test_layer_reads_read_only_that_layer(megatron_ckpt: Reference):
    """Reading every state of every parameter reads each saved byte about once (a layer of a stacked
    tensor comes from its own chunks, not from the whole stack)."""
    ckpt = MegatronCheckpoint(str(megatron_ckpt.ckpt))
    data = sum(f.stat().st_size for f in megatron_ckpt.ckpt.glob("*.distcp"))
    before = ucp.storage.read_counter()
    for name in ckpt.names():
        for state in ckpt.info(name).states:
            ckpt.read(name, state)
    read = (ucp.storage.read_counter() - before).bytes
    assert read <= 1.1 * data, (read, data)


@pytest.mark.slow
def test_megatron_lm_root_resolves_to_the_newest_save(megatron_ckpt: Reference, tmp_path):
    """A Megatron-LM save root (latest_checkpointed_iteration.txt + iter_NNNNNNN/) converts its newest
    save; a spec is refused rather than ignored."""
    root = tmp_path / "run"
    shutil.copytree(megatron_ckpt.ckpt, root / "iter_0000002")
    (root / "latest_checkpointed_iteration.txt").write_text("2\n")
    ckpt = ucp.convert(str(root), str(tmp_path / "u"))
    name = "decoder.layers.3.self_attention.linear_qkv.weight"
    assert _same(ckpt.read(name, state="exp_avg"), megatron_ckpt.tensors[f"{name}/exp_avg"])
    with pytest.raises(ucp.UcpError, match="drop --spec"):
        ucp.convert(str(root), str(tmp_path / "v"), spec="llama_megatron")


#: The tiny model as a Hugging Face Llama (Megatron's defaults: RMSNorm eps 1e-5, RoPE base 10000).
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": make.VOCAB,
         "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
         "max_position_embeddings": make.SEQ, "tie_word_embeddings": False, "hidden_act": "silu"}


@pytest.mark.slow
def test_export_to_hugging_face_llama_gives_megatrons_logits(megatron_ckpt: Reference, tmp_path):
    """convert, then `ucp export --map megatron-llama`: transformers' Llama loads the export and its
    logits equal Megatron's own tp=1 model's (loaded by Megatron from the same checkpoint) to bf16
    rounding, with the same next-token choices."""
    from click.testing import CliRunner
    from transformers import LlamaForCausalLM
    from ucp.cli import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    ucp.convert(str(megatron_ckpt.ckpt), str(tmp_path / "u"))
    r = CliRunner().invoke(main, ["export", str(tmp_path / "u"), str(tmp_path / "hf"), "--map", "megatron-llama",
                                  "--config", str(tmp_path / "config.json")])
    assert r.exit_code == 0, r.output
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        logits = model(megatron_ckpt.forward["tokens"]).logits.float()
    want = megatron_ckpt.forward["logits"]
    assert (logits - want).abs().max().item() <= 2 ** -6 * max(1.0, want.abs().max().item())
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


def _megatron_layer(path: Path) -> dict[str, torch.Tensor]:
    """A one-layer Megatron GPT (tp=1 names and fused layouts, vocabulary padded to 130) as a
    safetensors file; returns the Hugging Face Llama tensors it stands for, built independently."""
    g = torch.Generator().manual_seed(0)
    heads, groups, hd, hidden, ffn, per = 4, 2, 16, 64, 96, 2
    hf = {n: torch.randn(*shape, generator=g) for n, shape in {
        "model.embed_tokens.weight": (128, hidden), "lm_head.weight": (128, hidden), "model.norm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (heads * hd, hidden), "model.layers.0.self_attn.k_proj.weight": (groups * hd, hidden),
        "model.layers.0.self_attn.v_proj.weight": (groups * hd, hidden), "model.layers.0.self_attn.o_proj.weight": (hidden, heads * hd),
        "model.layers.0.mlp.gate_proj.weight": (ffn, hidden), "model.layers.0.mlp.up_proj.weight": (ffn, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, ffn), "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.post_attention_layernorm.weight": (hidden,)}.items()}
    a, m, pad = "model.layers.0.self_attn.", "model.layers.0.mlp.", torch.zeros(2, hidden)
    rows = [[hf[a + "q_proj.weight"][i * per * hd:(i + 1) * per * hd], hf[a + "k_proj.weight"][i * hd:(i + 1) * hd],
             hf[a + "v_proj.weight"][i * hd:(i + 1) * hd]] for i in range(groups)]
    save_file({"embedding.word_embeddings.weight": torch.cat([hf["model.embed_tokens.weight"], pad]),
               "output_layer.weight": torch.cat([hf["lm_head.weight"], pad]),
               "decoder.final_layernorm.weight": hf["model.norm.weight"],
               "decoder.layers.0.self_attention.linear_qkv.weight": torch.cat([t for r in rows for t in r]),
               "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": hf["model.layers.0.input_layernorm.weight"],
               "decoder.layers.0.self_attention.linear_proj.weight": hf[a + "o_proj.weight"],
               "decoder.layers.0.mlp.linear_fc1.weight": torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]]),
               "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": hf["model.layers.0.post_attention_layernorm.weight"],
               "decoder.layers.0.mlp.linear_fc2.weight": hf[m + "down_proj.weight"]}, str(path))
    return hf


def test_megatron_llama_map_splits_fused_tensors(tmp_path):
    """QKV per query group -> q/k/v, fc1 [gate; up] -> gate/up, padded vocabulary cut, names mapped."""
    from safetensors.torch import load_file

    want = _megatron_layer(tmp_path / "megatron.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "num_hidden_layers": 1}))
    export_hf(str(tmp_path / "megatron.safetensors"), str(tmp_path / "hf"), hf_map="megatron-llama",
              config=tmp_path / "config.json")
    got = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(got) == set(want)
    for name, t in want.items():
        assert _same(got[name], t), name


def test_megatron_llama_map_refuses_what_it_cannot_place(tmp_path):
    _megatron_layer(tmp_path / "m.safetensors")
    with pytest.raises(ucp.UcpError, match="needs --config"):
        export_hf(str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), hf_map="megatron-llama")
    with pytest.raises(ucp.UcpError, match="no Hugging Face map 'gpt9'.*megatron-llama"):
        export_hf(str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), hf_map="gpt9", config=__file__)
    (tmp_path / "bare.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ucp.UcpError, match="no num_attention_heads or hidden_size"):
        export_hf(str(tmp_path / "m.safetensors"), str(tmp_path / "hf"), hf_map="megatron-llama",
                  config=tmp_path / "bare.json")
    save_file({"decoder.layers.0.mlp.router.weight": torch.ones(2, 2)}, str(tmp_path / "r.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(ucp.UcpError, match="router.weight' has no Hugging Face name"):
        export_hf(str(tmp_path / "r.safetensors"), str(tmp_path / "hf2"), hf_map="megatron-llama",
                  config=tmp_path / "config.json")


# -- fast: layout rules on hand-made metadata -----------------------------------------------------

def test_detection_says_why_a_megatron_save_is_refused(tmp_path):
    """Megatron's metadata.json claims the directory: another backend, or a save without .metadata
    (interrupted), is refused by name instead of "no engine recognises it"."""
    from ucp.engines import detect_engine

    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ucp.UcpError, match="backend 'zarr'.*torch_dist"):
        detect_engine(str(tmp_path))
    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    (tmp_path / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(ucp.UcpError, match="without .metadata.*earlier iteration"):
        detect_engine(str(tmp_path))



def test_common_state_loads_megatron_lm_values_and_runs_nothing(tmp_path):
    """The common state's argparse args load as plain attributes; a class outside the allow-list is
    refused before anything runs."""
    buf = io.BytesIO()
    torch.save([{"args": argparse.Namespace(lr=0.5, dims=(2, 3)), "iteration": 9}], buf)
    (value,) = load_common(buf.getvalue(), where="x")
    assert value["iteration"] == 9 and value["args"].lr == 0.5 and value["args"].dims == (2, 3)
    assert _step([value], [{"step": 4.0}]) == 9 and _step([{}], [{"step": 4.0}, {"step": 3.0}]) == 4
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save({"x": _Runs(str(marker))}, buf)
    with pytest.raises(ucp.UnsafeInputError, match="common state"):
        load_common(buf.getvalue(), where="x")
    assert not marker.exists()


class _Runs:
    """Unpickling this would create a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))



def _entry(key: str, shape: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]],
           dtype=torch.float32) -> TensorEntry:
    return TensorEntry(key, (key,), shape, dtype, tuple(Chunk(o, s, "__0_0.distcp", 0, 1) for o, s in chunks))


def _stacked(key: str, layers: int, shape: tuple[int, ...], dtype=torch.float32) -> TensorEntry:
    zeros = (0,) * len(shape)
    return _entry(key, (layers, *shape), [((i, *zeros), (1, *shape)) for i in range(layers)], dtype)


def test_layers_unstack_to_megatron_tp1_names():
    key = "decoder.layers.self_attention.linear_qkv.weight"
    e = _stacked(key, 3, (8, 4), torch.bfloat16)
    meta = DcpMetadata("1.0.0", {key: e, f"optimizer.state.exp_avg.{key}": _stacked(f"optimizer.state.exp_avg.{key}", 3, (8, 4)),
                                 "decoder.final_layernorm.weight": _entry("decoder.final_layernorm.weight", (4,), [((0,), (4,))])}, {})
    layout = plan_layout(meta, where="x")
    assert list(layout.params) == [f"decoder.layers.{i}.self_attention.linear_qkv.weight" for i in range(3)] \
        + ["decoder.final_layernorm.weight"]
    assert layout.params["decoder.layers.2.self_attention.linear_qkv.weight"].layer == 2
    assert set(layout.states[key]) == {"exp_avg"}
    # a leading axis not cut per layer is not a stack; neither is a numbered layer
    assert stacked_axis(key, _entry(key, (3, 8, 4), [((0, 0, 0), (3, 8, 4))])) is None
    assert stacked_axis("decoder.layers.0.mlp.weight", _stacked("k", 2, (4,))) is None
    assert ucp_name("mtp.layers.x.w", 1, 5) == "mtp.layers.5.x.w"


def test_dp_reshardable_optimizer_is_refused_by_name():
    key = "optimizer.distributed.dp_group_idx_0.gbuf_idx_0.dtype_(torch.bfloat16, torch.bfloat16).exp_avg"
    meta = DcpMetadata("1.0.0", {"output_layer.weight": _entry("output_layer.weight", (4, 4), [((0, 0), (4, 4))]),
                                 key: _entry(key, (16,), [((0,), (16,))])}, {})
    with pytest.raises(ucp.UcpError, match="dp_reshardable.*fully_reshardable"):
        plan_layout(meta, where="ckpt")


def test_optimizer_state_of_another_shape_is_corrupt():
    meta = DcpMetadata("1.0.0", {"w": _entry("w", (4, 4), [((0, 0), (4, 4))]),
                                 "optimizer.state.exp_avg.w": _entry("optimizer.state.exp_avg.w", (4,), [((0,), (4,))])}, {})
    with pytest.raises(ucp.CorruptCheckpointError, match="optimizer.state.exp_avg.w"):
        plan_layout(meta, where="ckpt")


def test_default_groups_follow_megatrons_weight_decay_rule():
    p = {"a.weight": ParamInfo((4, 4), torch.float32, ("param",)), "a.bias": ParamInfo((4, 2), torch.float32, ("param",)),
         "n.weight": ParamInfo((4,), torch.float32, ("param",)), "f.weight": ParamInfo((4,), torch.float32, ("param",), frozen=True)}
    groups = [{"wd_mult": 0.0, "is_expert_parallel": False}, {"wd_mult": 1.0, "is_expert_parallel": False}]
    assert default_groups(p, groups) == {"a.weight": 1, "a.bias": 0, "n.weight": 0}
    assert default_groups(p, groups[:1]) == {"a.weight": 0, "a.bias": 0, "n.weight": 0}
    # groups Megatron made from overrides: membership cannot be told, so none is claimed
    assert default_groups(p, groups + [{"wd_mult": 1.0, "lr_mult": 0.1}]) == {}


def test_dcp_metadata_with_megatrons_save_plans_parses(tmp_path):
    """Megatron adds every rank's SavePlan (WriteItem, WriteItemType, TensorWriteData) to .metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties

    dcp.save({"w": torch.arange(12.0).reshape(3, 4)}, checkpoint_id=str(tmp_path), no_dist=True)
    md = pickle.loads((tmp_path / ".metadata").read_bytes())
    chunk = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([3, 4]))
    md.all_local_plans = [SavePlan([WriteItem(MetadataIndex("w", torch.Size([0, 0])), WriteItemType.SHARD,
                                              tensor_data=TensorWriteData(chunk, TensorProperties(torch.float32),
                                                                          torch.Size([3, 4])))])]
    buf = io.BytesIO()
    pickle.dump(md, buf)
    meta = parse_metadata(buf.getvalue(), where="x")
    assert meta.tensors["w"].shape == (3, 4)
    (tmp_path / ".metadata").write_bytes(buf.getvalue())
    files = DcpFiles(str(tmp_path))
    assert torch.equal(files.tensor(files.metadata.tensors["w"], ((1, 3), (2, 4))),
                       torch.arange(12.0).reshape(3, 4)[1:3, 2:4])


# -- the megatron reshard target (`ucp reshard --engine megatron`) ----------------------------------

def _reshard_cli(*args: str) -> None:
    from click.testing import CliRunner
    from ucp.cli import main

    r = CliRunner().invoke(main, ["reshard", *args])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,universal", [(2, 1, False), (1, 2, True), (2, 2, False)])
def test_megatron_loads_what_ucp_wrote_at_tp_pp(megatron_ckpt: Reference, tmp_path, tp, pp, universal):
    """`ucp reshard --engine megatron --to tp,pp` (from the Megatron checkpoint, or from its universal
    conversion): a real Megatron job at that tp x pp loads model and
    distributed optimizer with its own dist_checkpointing.load and load_state_dict (no ucp code), and
    saves what it holds; Megatron's own tp=1 load of that save equals the source's tp=1 load bit for
    bit: every weight, fp32 master and Adam moment, the param groups and their step."""
    from safetensors.torch import load_file

    out, again, src = tmp_path / "out", tmp_path / "again", str(megatron_ckpt.ckpt)
    if universal:
        src = str(tmp_path / "u")
        ucp.convert(str(megatron_ckpt.ckpt), src)
    _reshard_cli(src, str(out), "--to", f"tp={tp},pp={pp}", "--engine", "megatron")
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert json.loads((out / "iter_0000002" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    run_ranks(make.load_and_resave, tp * pp, args=(str(out / "iter_0000002"), str(again), tp, pp, True),
              timeout=600)
    (got,) = run_ranks(make.load_full, 1, args=(str(again), str(tmp_path / "tp1.safetensors"), True), timeout=300)
    tensors = load_file(tmp_path / "tp1.safetensors")
    assert set(tensors) == set(megatron_ckpt.tensors)
    for key, want in megatron_ckpt.tensors.items():
        assert _same(tensors[key], want), key
    assert got.value["groups"] == megatron_ckpt.groups
    assert _plain(got.value["param_groups"]) == _plain(megatron_ckpt.param_groups)
    assert MegatronCheckpoint(str(again)).step == 2  # the iteration Megatron loaded from common_state


@pytest.mark.slow
def test_megatron_target_refuses_what_megatron_lm_args_rule_out(megatron_ckpt: Reference, tmp_path):
    """The head counts of a Megatron source come from Megatron-LM's args in its common state: tp=4
    divides every tensor's rows but not the 2 query groups, and is refused before any byte is written."""
    with pytest.raises(ucp.TopologyError, match="tp=4 does not divide num_query_groups .* = 2"):
        ucp.reshard(str(megatron_ckpt.ckpt), str(tmp_path / "out"), topology="tp=4", engine="megatron")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny transformers Llama (the Megatron test model's shapes), saved with save_pretrained in bf16."""
    return _hf_model(tmp_path_factory.mktemp("hf") / "llama", make.VOCAB)


def _fused(hf: dict[str, torch.Tensor], layers: int, groups: int = 2) -> dict[str, torch.Tensor]:
    """Megatron's tp=1 tensors built by hand from Hugging Face's: q/k/v rows per query group, [gate; up]."""
    out = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"], "output_layer.weight": hf["lm_head.weight"]}
    for i in range(layers):
        a, m, d = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp.", f"decoder.layers.{i}."
        q, k, v = (hf[a + f"{x}_proj.weight"] for x in "qkv")
        rows = []
        for g in range(groups):
            qn, kn = q.shape[0] // groups, k.shape[0] // groups
            rows += [q[g * qn:(g + 1) * qn], k[g * kn:(g + 1) * kn], v[g * kn:(g + 1) * kn]]
        out[d + "self_attention.linear_qkv.weight"] = torch.cat(rows)
        out[d + "self_attention.linear_qkv.layer_norm_weight"] = hf[f"model.layers.{i}.input_layernorm.weight"]
        out[d + "self_attention.linear_proj.weight"] = hf[a + "o_proj.weight"]
        out[d + "mlp.linear_fc1.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        out[d + "mlp.linear_fc1.layer_norm_weight"] = hf[f"model.layers.{i}.post_attention_layernorm.weight"]
        out[d + "mlp.linear_fc2.weight"] = hf[m + "down_proj.weight"]
    return out


def test_hugging_face_llama_is_written_under_megatrons_names_and_layouts(hf_llama: Path, tmp_path):
    """HF -> `--engine megatron`: q/k/v and gate/up fused as Megatron lays them out, every tensor
    bit for bit, layers stacked one chunk per layer, weights only (no optimizer state)."""
    from safetensors.torch import load_file

    ucp.reshard(str(hf_llama), str(tmp_path / "out"), topology="tp=2", engine="megatron")
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "0"
    got = MegatronCheckpoint(str(tmp_path / "out" / "iter_0000000"))
    want = _fused(load_file(hf_llama / "model.safetensors"), LLAMA["num_hidden_layers"])
    assert set(got.names()) == set(want)
    for name, t in want.items():
        assert got.info(name).states == ("param",), name
        assert _same(got.read(name, "param"), t), name
    meta = got._files.metadata
    assert not [k for k in meta.tensors if k.startswith("optimizer.")]
    assert all(c.sizes[0] == 1 for c in meta.tensors["decoder.layers.mlp.linear_fc1.weight"].chunks)


@pytest.mark.parametrize("topology,match", [
    ("tp=3", "tp=3 does not divide num_attention_heads"),
    ("tp=4", "tp=4 does not divide num_query_groups"),
    ("pp=3", "pp=3 does not divide num_layers"),
    ("ep=2", "ep=2: the model has no experts"),
])
def test_megatron_target_refuses_bad_topologies_before_writing(hf_llama: Path, tmp_path, topology, match):
    with pytest.raises(ucp.TopologyError, match=match):
        ucp.reshard(str(hf_llama), str(tmp_path / "out"), topology=topology, engine="megatron")
    assert not (tmp_path / "out").exists()


def test_megatron_target_refuses_foreign_names_and_an_existing_save(hf_llama: Path, tmp_path):
    save_file({"encoder.weight": torch.ones(2, 2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ucp.UcpError, match="'encoder.weight' is not under Megatron's tp=1 names"):
        ucp.reshard(str(tmp_path / "plain.safetensors"), str(tmp_path / "o1"), topology="tp=1", engine="megatron")
    assert not (tmp_path / "o1").exists()
    ucp.reshard(str(hf_llama), str(tmp_path / "out"), topology="tp=1", engine="megatron")
    with pytest.raises(ucp.CheckpointExistsError, match="iter_0000000"):
        ucp.reshard(str(hf_llama), str(tmp_path / "out"), topology="tp=1", engine="megatron")
    ucp.reshard(str(hf_llama), str(tmp_path / "out"), topology="tp=1", engine="megatron", overwrite=True)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ucp.UcpError, match="notes.txt"):
        ucp.reshard(str(hf_llama), str(tmp_path / "busy"), topology="tp=1", engine="megatron")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_hugging_face_to_megatron_tp2_gives_transformers_logits(hf_llama: Path, tmp_path):
    """`ucp reshard hf_model/ out --to tp=2 --engine megatron`: a real Megatron GPTModel at tp=2 loads it
    (its own dist_checkpointing.load, model only) and its logits equal transformers' to bf16 rounding
    with the same next-token choices; what it holds, saved again by Megatron, is the fused Hugging
    Face tensors bit for bit."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    out, again = tmp_path / "out", tmp_path / "again"
    _reshard_cli(str(hf_llama), str(out), "--to", "tp=2", "--engine", "megatron")
    run_ranks(make.load_model_and_run, 2, args=(str(out / "iter_0000000"), str(again), 2, True), timeout=600)
    forward = load_file(f"{again}.forward")
    model = LlamaForCausalLM.from_pretrained(str(hf_llama), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = model(forward["tokens"]).logits.float()
    logits = forward["logits"]
    assert (logits - want).abs().max().item() <= 2 ** -6 * max(1.0, want.abs().max().item())
    assert torch.equal(logits.argmax(-1), want.argmax(-1))
    held = MegatronCheckpoint(str(again))
    for name, t in _fused(load_file(hf_llama / "model.safetensors"), LLAMA["num_hidden_layers"]).items():
        got = held.read(name, "param")
        assert _same(got, t.to(got.dtype)), name  # norms: Megatron keeps them in fp32 (exact widening)


def _hf_model(path: Path, vocab: int) -> Path:
    """A tiny transformers Llama (the Megatron test model's shapes, ``vocab`` rows), saved with
    save_pretrained in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(**{**{k: v for k, v in LLAMA.items() if k not in ("architectures", "model_type")},
                            "vocab_size": vocab})
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # norms away from 1, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def hf_llama_80(tmp_path_factory) -> Path:
    """The tiny Llama with an 80-row vocabulary: a multiple of no Megatron divisor."""
    return _hf_model(tmp_path_factory.mktemp("hf80") / "llama", 80)


def _megatron_job(src: Path, again: Path, tp: int, pp: int, dp: int, vocab: int, tokens_below: int,
                  bf16: bool = True, shape: dict | None = None) -> list:
    """The model-only Megatron job at tp x pp x dp; returns each rank's placement report."""
    got = run_ranks(make.load_model_and_run, tp * pp * dp,
                    args=(str(src), str(again), tp, bf16, pp, vocab, tokens_below, shape), timeout=600)
    return [g.value for g in got]


def _check_logits(hf: Path | torch.nn.Module, again: Path, vocab: int, tol: float = 2 ** -6) -> None:
    """The Megatron job's logits (its first ``vocab`` columns) equal transformers' (the model, or
    the one saved in folder ``hf``, in bf16) to ``tol`` (default: bf16 rounding), with the same
    next-token choices."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    forward = load_file(f"{again}.forward")
    model = hf if isinstance(hf, torch.nn.Module) else \
        LlamaForCausalLM.from_pretrained(str(hf), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = model(forward["tokens"]).logits.float()
    logits = forward["logits"][..., :vocab]
    assert want.shape == logits.shape
    assert (logits - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    assert torch.equal(logits.argmax(-1), want.argmax(-1))


def _check_stages(reports: list, hf: dict[str, torch.Tensor], tp: int, pp: int, vocab: int) -> None:
    """Megatron's own placement: stage s holds layers s*L/pp+1 .. (s+1)*L/pp (layer_number, 1-based),
    each with that Hugging Face layer's norm; the embedding on the first stage only, the output layer
    on the last only, each tp rank with vocab/tp rows."""
    per = LLAMA["num_hidden_layers"] // pp
    assert sorted({r["stage"] for r in reports}) == list(range(pp))
    for r in reports:
        s = r["stage"]
        assert r["layers"] == list(range(s * per + 1, (s + 1) * per + 1)), r["layers"]
        for number, norm in zip(r["layers"], r["norms"]):
            want = hf[f"model.layers.{number - 1}.input_layernorm.weight"].float().tolist()
            assert norm == want, (s, number)
        assert r["embedding"] == (s == 0) and r["output_layer"] == (s == pp - 1)
        assert r["vocab_rows"] == (vocab // tp if s in (0, pp - 1) else None)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 1), (1, 2, 2), (2, 2, 2)])
def test_hugging_face_to_megatron_tp_pp_gives_transformers_logits(hf_llama: Path, tmp_path, tp, pp, dp):
    """The issue's command `ucp reshard hf_model/ out --to tp=2,pp=2,dp=2 --engine megatron` (8 ranks),
    and tp=2 x pp=2, tp=1 x pp=2 x dp=2 (4 ranks): a real Megatron job at that topology loads it with its own dist_checkpointing.load (model only), runs
    it stage by stage, and its logits equal transformers'; each stage holds the layers Megatron
    numbers for it, the embedding on the first and the output layer on the last; what it holds,
    saved again by Megatron, is the fused Hugging Face tensors bit for bit."""
    from safetensors.torch import load_file

    out, again = tmp_path / "out", tmp_path / "again"
    _reshard_cli(str(hf_llama), str(out), "--to", f"tp={tp},pp={pp},dp={dp}", "--engine", "megatron")
    reports = _megatron_job(out / "iter_0000000", again, tp, pp, dp, make.VOCAB, make.VOCAB)
    _check_logits(hf_llama, again, make.VOCAB)
    hf = load_file(hf_llama / "model.safetensors")
    _check_stages(reports, hf, tp, pp, make.VOCAB)
    held = MegatronCheckpoint(str(again))
    for name, t in _fused(hf, LLAMA["num_hidden_layers"]).items():
        got = held.read(name, "param")
        assert _same(got, t.to(got.dtype)), name


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Megatron-LM's converters' padding: the last real row repeated."""
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], -1)])


@pytest.mark.slow
def test_padded_vocabulary_loads_in_megatron_and_gives_transformers_logits(hf_llama_80: Path, tmp_path):
    """80 vocabulary rows, `--make-vocab-size-divisible-by 128` at tp=2: written with 256 rows
    (Megatron-LM's rule: a multiple of 128 x tp), which a Megatron job at tp=2 x pp=2 built with
    vocab_size=256 loads; its first 80 logits equal transformers', its embedding and output layer,
    saved again, are the Hugging Face rows then the last row repeated, bit for bit."""
    from safetensors.torch import load_file

    out, again = tmp_path / "out", tmp_path / "again"
    _reshard_cli(str(hf_llama_80), str(out), "--to", "tp=2,pp=2", "--engine", "megatron",
                 "--make-vocab-size-divisible-by", "128")
    reports = _megatron_job(out / "iter_0000000", again, 2, 2, 1, 256, 80)
    _check_logits(hf_llama_80, again, 80)
    hf = load_file(hf_llama_80 / "model.safetensors")
    _check_stages(reports, hf, 2, 2, 256)
    held = MegatronCheckpoint(str(again))
    assert _same(held.read("embedding.word_embeddings.weight", "param"), _padded(hf["model.embed_tokens.weight"], 256))
    assert _same(held.read("output_layer.weight", "param"), _padded(hf["lm_head.weight"], 256))


@pytest.mark.slow
def test_padded_vocabulary_of_a_trained_megatron_checkpoint_keeps_its_optimizer(megatron_ckpt: Reference, tmp_path):
    """A Megatron checkpoint with its distributed optimizer (128 rows) -> `--padded-vocab 192 --to
    tp=2`: a real Megatron job at tp=2 built with vocab_size=192 loads model and optimizer, and
    Megatron's tp=1 load of what it saves again is the source's, every state bit for bit, with the
    embedding and output layer grown by 64 rows: weights and fp32 masters the last row repeated, Adam
    moments zero."""
    from safetensors.torch import load_file

    out, again = tmp_path / "out", tmp_path / "again"
    _reshard_cli(str(megatron_ckpt.ckpt), str(out), "--to", "tp=2", "--engine", "megatron", "--padded-vocab", "192")
    run_ranks(make.load_and_resave, 2, args=(str(out / "iter_0000002"), str(again), 2, 1, True, 192), timeout=600)
    run_ranks(make.load_full, 1, args=(str(again), str(tmp_path / "tp1.safetensors"), True, 192), timeout=300)
    tensors = load_file(tmp_path / "tp1.safetensors")
    assert set(tensors) == set(megatron_ckpt.tensors)
    for key, want in megatron_ckpt.tensors.items():
        if key.split("/")[0] in ("embedding.word_embeddings.weight", "output_layer.weight"):
            fill = want[-1:].expand(64, -1) if key.endswith(("/param", "/fp32")) else torch.zeros(64, want.shape[1])
            want = torch.cat([want, fill.to(want.dtype)])
        assert _same(tensors[key], want), key


def test_padded_vocabulary_is_written_and_export_drops_it(hf_llama_80: Path, tmp_path):
    """`--padded-vocab 96` writes 96 rows (the last real row repeated) for embedding and output layer,
    everything else as without padding; `ucp export --map megatron-llama --config` of that
    Megatron checkpoint gives back the Hugging Face model bit for bit (the padding cut to the
    config's vocab_size)."""
    from click.testing import CliRunner
    from safetensors.torch import load_file
    from ucp.cli import main

    out = tmp_path / "out"
    _reshard_cli(str(hf_llama_80), str(out), "--to", "tp=2", "--engine", "megatron", "--padded-vocab", "96")
    got = MegatronCheckpoint(str(out / "iter_0000000"))
    hf = load_file(hf_llama_80 / "model.safetensors")
    want = _fused(hf, LLAMA["num_hidden_layers"])
    want["embedding.word_embeddings.weight"] = _padded(hf["model.embed_tokens.weight"], 96)
    want["output_layer.weight"] = _padded(hf["lm_head.weight"], 96)
    assert set(got.names()) == set(want)
    for name, t in want.items():
        assert _same(got.read(name, "param"), t), name
    r = CliRunner().invoke(main, ["export", str(out / "iter_0000000"), str(tmp_path / "hf"), "--map",
                                  "megatron-llama", "--config", str(hf_llama_80 / "config.json")])
    assert r.exit_code == 0, r.output
    back = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert _same(back[name], t), name


def test_padded_vocabulary_rule_and_refusals(hf_llama_80: Path, tmp_path):
    """Megatron-LM's rule (a multiple of divisor x tp); a padded size below the vocabulary, both
    options at once, a padding for another engine, and a vocabulary tp does not divide are refused
    before any byte is written, naming the sizes and the fix."""
    from ucp.engines.megatron._target import padded_vocab_size

    assert padded_vocab_size(80, 2, vocab_divisible_by=128) == 256
    assert padded_vocab_size(80, 1, vocab_divisible_by=8) == 80
    assert padded_vocab_size(81, 4, vocab_divisible_by=8) == 96
    assert padded_vocab_size(80, 2) == 80
    dst = str(tmp_path / "out")
    with pytest.raises(ucp.UcpError, match="padded vocabulary size 64 is smaller than the vocabulary, 80 rows"):
        ucp.reshard(str(hf_llama_80), dst, topology="tp=1", engine="megatron", padded_vocab=64)
    with pytest.raises(ucp.UcpError, match=r"padded vocabulary size \(96\) or its divisor \(128\), not both"):
        ucp.reshard(str(hf_llama_80), dst, topology="tp=1", engine="megatron", padded_vocab=96,
                    vocab_divisible_by=128)
    with pytest.raises(ucp.UcpError, match="padded_vocab pad a Megatron vocabulary: .* not 'dcp'"):
        ucp.reshard(str(hf_llama_80), dst, topology="tp=1", engine="dcp", padded_vocab=96)
    with pytest.raises(ucp.TopologyError, match="tp=2 does not divide the vocabulary .* --padded-vocab"):
        ucp.reshard(str(hf_llama_80), dst, topology="tp=2", engine="megatron", padded_vocab=81)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_accelerate_fsdp2_save_of_a_hugging_face_llama_loads_in_megatron(framework_job, tmp_path):
    """A DCP source under Hugging Face names: a real accelerate FSDP2 save_state of a transformers
    Llama (fp32, trained 3 steps; DCP with no config.json) -> `ucp reshard --engine megatron
    --hf-config config.json --to tp=2`: a real Megatron job at tp=2 (fp32) loads it; what it holds,
    saved again by Megatron, is the trained weights fused bit for bit, and its logits equal
    transformers' on those weights to fp32 rounding (1e-5)."""
    import _accel_make as accel
    from transformers import LlamaConfig, LlamaForCausalLM

    run = framework_job("_accel_make", "make_accelerate", "accelerate")
    ref = torch.load(run / "full.pt", weights_only=True)["model"]
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": accel.VOCAB,
              "hidden_size": accel.HIDDEN, "intermediate_size": 48, "num_hidden_layers": accel.LAYERS,
              "num_attention_heads": accel.HEADS, "num_key_value_heads": accel.KV_HEADS,
              "max_position_embeddings": accel.SEQ * 2, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out, again = tmp_path / "out", tmp_path / "again"
    _reshard_cli(str(run / "state"), str(out), "--to", "tp=2", "--engine", "megatron",
                 "--hf-config", str(tmp_path / "config.json"))
    (save,) = out.glob("iter_*")
    shape = dict(num_layers=accel.LAYERS, hidden_size=accel.HIDDEN, num_attention_heads=accel.HEADS,
                 num_query_groups=accel.KV_HEADS, ffn_hidden_size=48, layernorm_epsilon=1e-6)
    _megatron_job(save, again, 2, 1, 1, accel.VOCAB, accel.VOCAB, bf16=False, shape=shape)
    held = MegatronCheckpoint(str(again))
    fused = _fused(ref, accel.LAYERS, groups=accel.KV_HEADS)
    assert set(held.names()) == set(fused)
    for name, t in fused.items():
        assert _same(held.read(name, "param"), t), name
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items()
                                            if k not in ("architectures", "model_type")}))
    missing, unexpected = model.load_state_dict(ref, strict=False)
    assert not missing and unexpected == ["logit_scale"]  # the test job's extra buffer
    _check_logits(model.eval(), again, accel.VOCAB, tol=1e-5)  # fp32 on both sides


@pytest.mark.slow
def test_deepspeed_autotp_save_of_a_hugging_face_llama_loads_in_megatron_padded(ds_mp_checkpoint, tmp_path):
    """A DeepSpeed source under Hugging Face names: a real DeepSpeed AutoTP (tp=2, bf16) save of a
    transformers Llama -> `ucp reshard --engine megatron --hf-config config.json --to tp=2
    --make-vocab-size-divisible-by 48` (64 rows padded to 96): a real Megatron job at tp=2 built with
    vocab_size=96 loads it; what it holds, saved again, is the model `ucp export` makes of the same
    DeepSpeed files (itself checked against DeepSpeed's own gather in test_convert_deepspeed_mp)
    fused and padded, bit for bit, and its first 64 logits equal transformers' on that model."""
    from safetensors.torch import load_file

    src, gathered = ds_mp_checkpoint("autotp_tp2")
    config = json.loads((gathered / "config.json").read_text())
    r = CliRunner().invoke(main, ["export", str(src), str(tmp_path / "hf"), "--config", str(gathered / "config.json"), "-q"])
    assert r.exit_code == 0, r.output
    hf = load_file(tmp_path / "hf" / "model.safetensors")
    out, again = tmp_path / "out", tmp_path / "again"
    _reshard_cli(str(src), str(out), "--to", "tp=2", "--engine", "megatron", "--hf-config",
                 str(gathered / "config.json"), "--make-vocab-size-divisible-by", "48")
    (save,) = out.glob("iter_*")
    vocab, layers = config["vocab_size"], config["num_hidden_layers"]
    shape = dict(num_layers=layers, hidden_size=config["hidden_size"], num_attention_heads=config["num_attention_heads"],
                 num_query_groups=config["num_key_value_heads"], ffn_hidden_size=config["intermediate_size"],
                 layernorm_epsilon=config["rms_norm_eps"])
    _megatron_job(save, again, 2, 1, 1, 96, vocab, bf16=True, shape=shape)
    want = _fused(hf, layers, groups=config["num_key_value_heads"])
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        want[name] = _padded(want[name], 96)
    held = MegatronCheckpoint(str(again))
    assert set(held.names()) == set(want)
    for name, t in want.items():
        got = held.read(name, "param")
        assert _same(got, t.to(got.dtype)), name  # norms: Megatron keeps them in fp32 (exact widening)
    _check_logits(tmp_path / "hf", again, vocab)


def test_hugging_face_names_without_a_config_are_refused_naming_the_option(hf_llama: Path, tmp_path):
    """A save under Hugging Face names with no config.json beside it needs --hf-config (the head
    counts fuse q/k/v); given one, it is written as the folder would be."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    hf = load_file(hf_llama / "model.safetensors")
    dcp.save(dict(hf), checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    with pytest.raises(ucp.UcpError, match=r"parameter '.*' is a Hugging Face name and no config.json .*\(--hf-config\)"):
        ucp.reshard(str(tmp_path / "dcp"), str(tmp_path / "o1"), topology="tp=2", engine="megatron")
    assert not (tmp_path / "o1").exists()
    with pytest.raises(ucp.UcpError, match="for --engine megatron only, not 'dcp'"):
        ucp.reshard(str(tmp_path / "dcp"), str(tmp_path / "o1"), topology="tp=2", engine="dcp",
                    hf_config=str(hf_llama / "config.json"))
    ucp.reshard(str(tmp_path / "dcp"), str(tmp_path / "out"), topology="tp=2", engine="megatron",
                hf_config=str(hf_llama / "config.json"))
    got = MegatronCheckpoint(str(tmp_path / "out" / "iter_0000000"))
    for name, t in _fused(hf, LLAMA["num_hidden_layers"]).items():
        assert _same(got.read(name, "param"), t), name


def test_unpickled_megatron_objects_have_a_repr():
    """Megatron's dataclasses (OptimizerConfig) are unpickled by ``__setstate__`` alone: the stand-in
    never ran ``__init__`` and its repr raised AttributeError."""
    from ucp.engines.megatron._common import _STAND_INS

    stand_in = next(cls for cls, name in _STAND_INS if name.endswith(".OptimizerConfig"))
    obj = stand_in.__new__(stand_in)  # what the unpickler does for a dataclass
    obj.__setstate__({"lr": 3e-4, "weight_decay": 0.1})
    assert repr(obj) == "OptimizerConfig(lr=0.0003, weight_decay=0.1)"
    # through load_common: whichever class torch resolves (Megatron may register its own as safe),
    # the loaded object has a repr with its fields
    from megatron.core.optimizer.optimizer_config import OptimizerConfig

    buf = io.BytesIO()
    torch.save({"optimizer_config": OptimizerConfig(lr=3e-4, weight_decay=0.1)}, buf)
    text = repr(load_common(buf.getvalue(), where="common.pt")["optimizer_config"])
    assert text.startswith("OptimizerConfig(") and "lr=0.0003" in text and "weight_decay=0.1" in text
