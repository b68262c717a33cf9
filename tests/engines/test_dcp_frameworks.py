"""Checkpoints that torchtitan 0.3 and accelerate (FSDP2 ``save_state``) write themselves, converted
by a plain ``ucp convert ROOT DST`` and compared bit for bit with the full state torch gathers in the
job (``_titan_make.py``, ``_accel_make.py``: 2 ranks, CPU, gloo, a few training steps)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.ops._export import export_hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _titan_make as titan  # noqa: E402 - the rank functions live beside the tests


def _same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got, want), f"{what} differs"


# -- torchtitan --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def titan_run(framework_job) -> Path:
    """A torchtitan job's output: ``checkpoint/step-{2,4}`` (full state), ``checkpoint/step-5`` (model
    only, torchtitan's last save) and ``full-4.pt``, ``full-5.pt``."""
    return framework_job("_titan_make", "make_titan", "torchtitan")


def _titan_moment(ref: dict[str, Any], name: str, state: str) -> torch.Tensor:
    """The job's gathered optimizer state of ``name``; the fused ``wqkv`` state cut by torchtitan's
    own save hook (``FusedQKVLinear._split_qkv_on_save``) for ``wq``/``wk``/``wv``."""
    prefix, part, suffix = name.rpartition(".")[0].rpartition(".")[0], name.split(".")[-2], name.split(".")[-1]
    if part not in ("wq", "wk", "wv"):
        return ref["optim"][f"state.{name}.{state}"]
    from torchtitan.models.common.attention import FusedQKVLinear

    q_per_kv = ref["heads"] // ref["kv_heads"]
    module = SimpleNamespace(head_dim=ref["head_dim"], heads_per_kv=q_per_kv, r_dim=q_per_kv + 2)
    sd = {f"{prefix}.wqkv.{suffix}": ref["optim"][f"state.{prefix}.wqkv.{suffix}.{state}"]}
    FusedQKVLinear._split_qkv_on_save(module, sd, f"{prefix}.", None)
    return sd[name]


@pytest.mark.slow
def test_torchtitan_root_converts_full_state(titan_run: Path, tmp_path: Path) -> None:
    ref = torch.load(titan_run / "full-4.pt", weights_only=True)
    root, dst = titan_run / "checkpoint", tmp_path / "universal"
    r = CliRunner().invoke(main, ["convert", str(root), str(dst), "--step", "4", "--spec",
                                  f"head_dim = {ref['head_dim']}", "-q"])
    assert r.exit_code == 0, r.output
    assert "torchtitan checkpoint folder: 3 step(s) (2, 4, 5), newest step-5" in r.output
    got = ucp.open(str(dst))
    assert got.step == 4 and sorted(got.names()) == sorted(ref["model"])
    fused = [n for n in got.names() if ".wq." in n or ".wk." in n or ".wv." in n]
    assert len(fused) == 6
    for name in got.names():
        _same(got.read(name, "fp32"), ref["model"][name], f"{name} fp32")
        for state in ("exp_avg", "exp_avg_sq"):
            _same(got.read(name, state), _titan_moment(ref, name, state), f"{name} {state}")
        decay = ref["optim"][f"param_groups.{name.replace('.wq.', '.wqkv.').replace('.wk.', '.wqkv.').replace('.wv.', '.wqkv.')}.weight_decay"]
        assert got.param_groups[got.info(name).group]["weight_decay"] == decay, name
    assert got.extras["lr_scheduler"] == ref["lr_scheduler"]
    assert got.extras["train_state"] == ref["train_state"]
    # head_dim told the reader how to cut; it is no layout spec for verify and reshard to apply
    assert got.spec is None and got.metadata["source"]["constants"] == {"head_dim": ref["head_dim"]}
    for checked in ([str(dst)], [str(root), "--step", "4", "--spec", f"head_dim = {ref['head_dim']}"]):
        r = CliRunner().invoke(main, ["verify", *checked])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["reshard", str(dst), str(tmp_path / "dp2"), "--to", "dp=2"])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_torchtitan_newest_step_is_its_model_only_last_save(titan_run: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    ref = torch.load(titan_run / "full-5.pt", weights_only=True)
    got = ucp.convert(str(titan_run / "checkpoint"), str(tmp_path / "u"))  # plain: newest step
    assert got.step == 5 and sorted(got.names()) == sorted(ref["model"])
    for name in got.names():
        assert got.info(name).states == ("fp32",)
        _same(got.read(name, "fp32"), ref["model"][name], f"{name} fp32")
    assert "holds the model only" in caplog.text and "--step" in caplog.text


@pytest.mark.slow
def test_torchtitan_step_choice_and_missing_head_dim(titan_run: Path, tmp_path: Path) -> None:
    root = titan_run / "checkpoint"
    got = ucp.convert(str(root), str(tmp_path / "u2"), spec="head_dim = 16", tag="2")
    assert got.step == 2 and got.extras["train_state"]["step"] == 2
    r = CliRunner().invoke(main, ["convert", str(root), str(tmp_path / "u"), "--step", "4"])
    assert r.exit_code == 1
    assert "wqkv" in r.output and "--spec 'head_dim = " in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["convert", str(root), str(tmp_path / "u3"), "--step", "4", "--spec", "head_dim = 5"])
    assert r.exit_code == 1 and "head_dim = 5 does not fit" in r.output


# -- torchtitan -> Hugging Face (ucp export --map torchtitan-llama) ------------------------------
def _titan_hf_config(path: Path, ref: dict[str, Any]) -> Path:
    """The job's tiny torchtitan Llama as a Hugging Face ``LlamaConfig`` (torchtitan's RMSNorm eps
    1e-5, its "llama" RoPE scaling = transformers' "llama3"), written to ``path``."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": titan.VOCAB,
              "hidden_size": titan.DIM, "intermediate_size": ref["model"]["layers.0.feed_forward.w1.weight"].shape[0],
              "num_hidden_layers": titan.LAYERS, "num_attention_heads": ref["heads"],
              "num_key_value_heads": ref["kv_heads"], "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "max_position_embeddings": 8192, "tie_word_embeddings": False,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}}
    path.write_text(json.dumps(config))
    return path


def _hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.slow
def test_torchtitan_export_to_hugging_face_gives_torchtitans_logits(titan_run: Path, tmp_path: Path) -> None:
    """A real torchtitan Llama (GQA, fused wqkv) -> ``ucp export --map torchtitan-llama``, from the
    universal checkpoint of step 4 and straight from the torchtitan root (steps 4 and 5):
    transformers' logits on the job's batch equal torchtitan's own model's within fp32 rounding."""
    from safetensors.torch import load_file, save_file
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    (tmp_path / "wrong").mkdir()
    root = titan_run / "checkpoint"
    # step 4 (a full save: fused wqkv moments) from its universal checkpoint and straight from the
    # root with no head_dim (an export reads weights only); step 5, the root's newest
    for step, src, pick in ((4, tmp_path / "u", []), (4, root, ["--step", "4"]), (5, root, [])):
        ref = torch.load(titan_run / f"full-{step}.pt", weights_only=True)
        config, out = _titan_hf_config(tmp_path / "config.json", ref), tmp_path / f"hf-{step}-{len(pick)}"
        if src != root:
            ucp.convert(str(root), str(src), spec=f"head_dim = {ref['head_dim']}", tag=str(step))
        r = CliRunner().invoke(main, ["export", str(src), str(out), "--map", "torchtitan-llama",
                                      "--config", str(config), "-q", *pick])
        assert r.exit_code == 0, r.output
        # the same fp32 weights: the two models differ only in the order of their float sums (fused
        # wqkv matmul vs three projections, complex vs rotate-half RoPE). Measured: 2.4e-7 at most
        # (largest logit 4.4), a few fp32 ulps; 1e-6 of the largest logit leaves room for other
        # kernels, and is far below an export without the per-head reordering (5.8e-4, below)
        logits, want = _hf_logits(out, ref["tokens"]), ref["logits"]
        tol = 1e-6 * max(1.0, want.abs().max().item())
        assert logits.dtype == want.dtype == torch.float32
        assert (logits - want).abs().max().item() <= tol, step
        assert torch.equal(logits.argmax(-1), want.argmax(-1))
        hf, model = load_file(out / "model.safetensors"), ref["model"]
        if pick:  # the check can fail: q/k rows left in torchtitan's order
            wrong = {**hf, **{f"model.layers.{i}.self_attn.{p}_proj.weight":
                              model[f"layers.{i}.attention.qkv_linear.w{p}.weight"] for i in range(2) for p in "qk"}}
            save_file(wrong, str(tmp_path / "wrong" / "model.safetensors"), metadata={"format": "pt"})
            shutil.copy(config, tmp_path / "wrong" / "config.json")
            assert (_hf_logits(tmp_path / "wrong", ref["tokens"]) - want).abs().max().item() > 10 * tol
        # every weight bit for bit as torchtitan's own adapter gives it (q/k permuted, the rest as is)
        adapted = Llama3StateDictAdapter(titan.tiny_llama_config(), None).to_hf(dict(model))
        assert sorted(hf) == sorted(adapted) and len(hf) == len(model)
        for name, t in adapted.items():
            _same(hf[name], t, name)


def _titan_state() -> dict[str, torch.Tensor]:
    """Random weights under the tiny torchtitan Llama's names and shapes (GQA: 4 heads, 2 KV heads)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in titan.tiny_llama_config().build().state_dict().items()}
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(*shape, generator=g) for k, shape in shapes.items()}


def test_torchtitan_llama_map_reorders_rows_per_head_as_torchtitan_does(tmp_path: Path) -> None:
    """The export equals torchtitan's own Hugging Face adapter (``Llama3StateDictAdapter.to_hf``)
    bit for bit; and, row by row, HF row ``h*hd + c*hd/2 + j`` is torchtitan's ``h*hd + 2j + c`` of the
    same head ``h`` (a permutation over the whole matrix, or none, fails this)."""
    pytest.importorskip("torchtitan")
    from safetensors.torch import load_file, save_file
    from torchtitan.models.llama3.state_dict_adapter import Llama3StateDictAdapter

    state = _titan_state()
    save_file(state, str(tmp_path / "titan.safetensors"))
    ref = {"model": state, "heads": titan.HEADS, "kv_heads": titan.KV_HEADS}
    r = CliRunner().invoke(main, ["export", str(tmp_path / "titan.safetensors"), str(tmp_path / "hf"), "--map",
                                  "torchtitan-llama", "--config", str(_titan_hf_config(tmp_path / "c.json", ref))])
    assert r.exit_code == 0, r.output
    got = load_file(tmp_path / "hf" / "model.safetensors")
    want = Llama3StateDictAdapter(titan.tiny_llama_config(), None).to_hf(dict(state))
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        _same(got[name], t, name)
    hd = titan.DIM // titan.HEADS
    for proj, part, heads in (("q_proj", "wq", titan.HEADS), ("k_proj", "wk", titan.KV_HEADS)):
        src, out = state[f"layers.1.attention.qkv_linear.{part}.weight"], got[f"model.layers.1.self_attn.{proj}.weight"]
        rows = [h * hd + 2 * j + c for h in range(heads) for c in range(2) for j in range(hd // 2)]
        _same(out, src[rows], proj)
        whole = src.reshape(heads * hd // 2, 2, -1).transpose(0, 1).reshape(src.shape)  # one "head"
        assert not torch.equal(out, whole) and not torch.equal(out, src)


def _export(tmp_path: Path, config: Path) -> None:
    export_hf(str(tmp_path / "titan.safetensors"), str(tmp_path / "hf"), hf_map="torchtitan-llama", config=config)


def test_torchtitan_llama_map_checks_the_config_against_the_weights(tmp_path: Path) -> None:
    pytest.importorskip("torchtitan")
    from safetensors.torch import save_file

    save_file(_titan_state(), str(tmp_path / "titan.safetensors"))
    wrong = _titan_hf_config(tmp_path / "c.json", {"model": _titan_state(), "heads": 2, "kv_heads": 2})
    with pytest.raises(ucp.UcpError, match=r"wk tensor has 32 rows.*2 heads x head_dim 32 = 64"):
        _export(tmp_path, wrong)
    assert not (tmp_path / "hf" / "model.safetensors").exists()  # refused before a byte is written
    (tmp_path / "bare.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ucp.UcpError, match="no num_attention_heads or hidden_size.*torchtitan-llama"):
        _export(tmp_path, tmp_path / "bare.json")
    save_file({"layers.0.moe.router.weight": torch.ones(2, 2)}, str(tmp_path / "titan.safetensors"))
    with pytest.raises(ucp.UcpError, match="router.weight' has no Hugging Face name"):
        _export(tmp_path, _titan_hf_config(tmp_path / "c.json", {"model": _titan_state(), "heads": titan.HEADS,
                                                                   "kv_heads": titan.KV_HEADS}))


# -- accelerate --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def accelerate_run(framework_job) -> Path:
    """An accelerate FSDP2 job's output: ``state/`` (save_state) and ``full.pt``."""
    return framework_job("_accel_make", "make_accelerate", "accelerate")


@pytest.mark.slow
def test_accelerate_save_state_converts_full_state(accelerate_run: Path, tmp_path: Path) -> None:
    ref = torch.load(accelerate_run / "full.pt", weights_only=True)
    dst = tmp_path / "universal"
    r = CliRunner().invoke(main, ["convert", str(accelerate_run / "state"), str(dst), "-q"])
    assert r.exit_code == 0, r.output
    assert "accelerate FSDP save_state: pytorch_model_fsdp_0/ + optimizer_0/" in r.output
    got = ucp.open(str(dst))
    frozen = "model.norm.weight"
    assert sorted(got.names()) == sorted([*ref["optim"]["state"], frozen]) and frozen not in ref["optim"]["state"]
    assert got.step == 3 and got.info(frozen).frozen and got.info(frozen).states == ("fp32",)
    for name in got.names():
        _same(got.read(name, "fp32"), ref["model"][name], f"{name} fp32")
        for state in ("exp_avg", "exp_avg_sq") if name != frozen else ():
            _same(got.read(name, state), ref["optim"]["state"][name][state], f"{name} {state}")
    assert got.buffer_names() == ["logit_scale"]
    _same(got.read_buffer("logit_scale"), ref["model"]["logit_scale"], "buffer")
    groups = ref["optim"]["param_groups"]
    assert [(g["lr"], g["weight_decay"]) for g in got.param_groups] == [(g["lr"], g["weight_decay"]) for g in groups]
    for i, g in enumerate(groups):
        assert all(got.info(n).group == i for n in g["params"])
    assert got.extras["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]
