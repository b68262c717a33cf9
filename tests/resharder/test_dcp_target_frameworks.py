"""``ucp reshard --engine torchtitan`` and ``--engine accelerate``: the frameworks' own loaders read it.

The slow tests run the real making jobs of ``tests/engines/`` (``_titan_make.py``: torchtitan's
Llama 3 under FSDP2 on 2 ranks, saved by its ``CheckpointManager``; ``_accel_make.py``: a Hugging
Face Llama under accelerate's FSDP2 on 2 ranks, ``save_state``), reshard their saves for 1 or 3
ranks, and let a stock job of that size (``_framework_resume_job.py``: no ucp import) load the
result with the framework's own loader: torchtitan's ``CheckpointManager.load`` with
``checkpoint.folder`` at ucp's output, accelerate's ``load_state``. The state the resumed job holds
(gathered by torch, ``full_state_dict=True``) must equal the source job's bit for bit: weights,
AdamW moments, optimizer steps, hyper-parameters, LR scheduler and train state.

The fast tests check the layout against torch's own DCP reader and the refusals.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

import ucp
from ucp.cli import main
from ucp.testing import run_command, scaled_timeout

HERE = Path(__file__).resolve().parent
JOB = HERE / "_framework_resume_job.py"


def _engines_helper(name: str):
    """A helper of tests/engines (its making jobs, its conftest's ``free_port``)."""
    spec = importlib.util.spec_from_file_location(f"ucp_tests_dcpfw{name}", HERE.parent / "engines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _same(got: Any, want: Any, what: str) -> None:
    """Equal bit for bit: tensors (dtype, shape, values), and containers of them, recursively."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), what
        assert got.dtype == want.dtype and got.shape == want.shape, what
        assert torch.equal(got, want), f"{what} differs"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), what
        for k in want:
            _same(got[k], want[k], f"{what}/{k}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{what}[{i}]")
    else:
        assert got == want and type(got) is type(want), f"{what}: {got!r} != {want!r}"


def _resume(kind: str, ranks: int, folder: Path, record: Path, *flags: str) -> dict[str, Any]:
    """What a stock ``kind`` job of ``ranks`` processes holds after loading ``folder``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(_engines_helper("conftest").free_port()), str(JOB), kind,
           str(folder), str(record), *flags]
    run_command(cmd, what=f"stock {kind} job on {ranks} ranks loading {folder}", timeout=scaled_timeout(400))
    return torch.load(record, weights_only=True)


def _reshard(*args: str) -> None:
    r = CliRunner().invoke(main, ["reshard", *args, "-q"])
    assert r.exit_code == 0, r.output


# -- torchtitan --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def titan_root(tmp_path_factory) -> Path:
    """A torchtitan job's dump folder (2 ranks): ``checkpoint/step-{2,4,5}``, ``full-{4,5}.pt``."""
    pytest.importorskip("torchtitan", reason="install the test extra (torchtitan; see the Makefile)")
    from ucp.testing import run_ranks

    out = tmp_path_factory.mktemp("titan")
    run_ranks(_engines_helper("_titan_make").make_titan, 2, args=(str(out),), timeout=600)
    return out


def _check_titan(seen: dict[str, Any], ref: dict[str, Any]) -> None:
    for key in ("model", "optim", "lr_scheduler", "train_state"):
        _same(seen[key], ref[key], key)
    # the fused wqkv moments and steps are among them, under torchtitan's own flattened keys
    assert any(k.endswith(".wqkv.weight.exp_avg") for k in seen["optim"])
    assert seen["train_state"]["step"] == 4 and seen["lr_scheduler"] == {"last_epoch": 4}
    # the same weights on another number of ranks: the same logits, up to the order of float sums
    assert (seen["logits"] - ref["logits"]).abs().max().item() <= 1e-6 * ref["logits"].abs().max().item()


@pytest.mark.slow
def test_torchtitan_resumes_on_3_ranks_from_its_2_rank_save(titan_root: Path, tmp_path: Path) -> None:
    """torchtitan root (dp=2, step 4 of 2/4/5) -> ``ucp reshard ROOT DST --to dp=3 --engine torchtitan
    --step 4 --spec 'head_dim = 16'`` -> torchtitan's CheckpointManager (folder DST) on 3 ranks."""
    ref = torch.load(titan_root / "full-4.pt", weights_only=True)
    dst = tmp_path / "titan-dp3"
    _reshard(str(titan_root), str(dst), "--to", "dp=3", "--engine", "torchtitan", "--step", "4",
             "--spec", f"head_dim = {ref['head_dim']}")
    assert sorted(p.name for p in dst.iterdir()) == ["step-4"] and (dst / "step-4" / ".metadata").is_file()
    _check_titan(_resume("torchtitan", 3, dst, tmp_path / "seen.pt"), ref)


@pytest.mark.slow
def test_torchtitan_resumes_on_1_rank_from_a_universal_checkpoint(titan_root: Path, tmp_path: Path) -> None:
    """The same through a universal checkpoint (``ucp convert``, then ``reshard --to dp=1``)."""
    ref = torch.load(titan_root / "full-4.pt", weights_only=True)
    spec = f"head_dim = {ref['head_dim']}"
    ucp.convert(str(titan_root / "checkpoint"), str(tmp_path / "u"), spec=spec, tag="4", progress=False)
    dst = tmp_path / "titan-dp1"
    _reshard(str(tmp_path / "u"), str(dst), "--to", "dp=1", "--engine", "torchtitan", "--spec", spec)
    _check_titan(_resume("torchtitan", 1, dst, tmp_path / "seen.pt"), ref)


def _unfused(ref: dict[str, Any]) -> dict[str, Any]:
    """``ref`` as a model built with ``fuse_qkv=False`` holds it: each fused ``wqkv`` optimizer entry
    as ``wq``/``wk``/``wv`` ones, the moments cut by torchtitan's own save hook
    (``test_dcp_frameworks._titan_moment``)."""
    frameworks = _engines_helper("test_dcp_frameworks")
    optim: dict[str, Any] = {}
    for key, value in ref["optim"].items():
        if ".wqkv." not in key:
            optim[key] = value
            continue
        kind, rest = key.split(".", 1)  # state.<fqn>.<state> or param_groups.<fqn>.<hyper-parameter>
        fqn, leaf = rest.rsplit(".", 1)
        for part in ("wq", "wk", "wv"):
            name = fqn.replace(".wqkv.", f".{part}.")
            moment = kind == "state" and leaf in ("exp_avg", "exp_avg_sq")
            optim[f"{kind}.{name}.{leaf}"] = frameworks._titan_moment(ref, name, leaf) if moment else value
    return {**ref, "optim": optim}


@pytest.mark.slow
def test_torchtitan_unfused_model_resumes_with_fuse_qkv_0(titan_root: Path, tmp_path: Path) -> None:
    """``--spec 'fuse_qkv = 0'``: a torchtitan job whose model is built with ``fuse_qkv=False`` (2
    ranks) resumes from the fused job's step 4 with the moments cut as torchtitan's save hook cuts them."""
    ref = torch.load(titan_root / "full-4.pt", weights_only=True)
    ucp.convert(str(titan_root / "checkpoint"), str(tmp_path / "u"), spec=f"head_dim = {ref['head_dim']}",
                tag="4", progress=False)
    dst = tmp_path / "titan-unfused"
    _reshard(str(tmp_path / "u"), str(dst), "--to", "dp=2", "--engine", "torchtitan", "--spec", "fuse_qkv = 0")
    seen = _resume("torchtitan", 2, dst, tmp_path / "seen.pt", "unfused")
    want = _unfused(ref)
    for key in ("model", "optim", "lr_scheduler", "train_state"):
        _same(seen[key], want[key], key)
    assert any(k.endswith(".wk.weight.exp_avg_sq") for k in seen["optim"])
    assert not any(".wqkv." in k for k in seen["optim"])


# -- accelerate --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def accelerate_root(tmp_path_factory) -> Path:
    """An accelerate FSDP2 job's output (2 ranks): ``state/`` (save_state) and ``full.pt``."""
    pytest.importorskip("accelerate", reason="install the test extra (accelerate; see the Makefile)")
    from ucp.testing import run_ranks

    out = tmp_path_factory.mktemp("accelerate")
    run_ranks(_engines_helper("_accel_make").make_accelerate, 2, args=(str(out),), timeout=600)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [3, 1])
def test_accelerate_load_state_reads_it(accelerate_root: Path, tmp_path: Path, ranks: int) -> None:
    """accelerate save_state (dp=2) -> ``ucp reshard STATE DST --to dp=N --engine accelerate`` ->
    ``accelerator.load_state(DST)`` in an FSDP2 job on N ranks: model (the frozen norm and the
    buffer too), optimizer and LR scheduler as the source job held them."""
    ref = torch.load(accelerate_root / "full.pt", weights_only=True)
    dst = tmp_path / f"accel-dp{ranks}"
    _reshard(str(accelerate_root / "state"), str(dst), "--to", f"dp={ranks}", "--engine", "accelerate")
    assert sorted(p.name for p in dst.iterdir()) == ["optimizer_0", "pytorch_model_fsdp_0", "scheduler.bin"]
    seen = _resume("accelerate", ranks, dst, tmp_path / "seen.pt")
    _same(seen, ref, "state")
    # accelerate steps the scheduler once per process and step: 3 steps on 2 ranks
    assert seen["scheduler"]["last_epoch"] == 6 and "model.norm.weight" not in seen["optim"]["state"]


# -- fast: the layouts, read back by torch's own dcp_to_torch_save; the refusals ------------------
HEAD_DIM, HEADS, KV_HEADS, DIM = 4, 4, 2, 8


class _Attention(torch.nn.Module):
    """torchtitan's attention projections unfused (``wq``/``wk``/``wv``), grouped-query."""

    def __init__(self) -> None:
        super().__init__()
        self.wq = torch.nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.wk = torch.nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.wv = torch.nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)


class _Titanish(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].attention = _Attention()
        self.norm = torch.nn.LayerNorm(HEADS * HEAD_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layers[0].attention
        return self.norm(a.wq(x)).sum() + a.wk(x).square().sum() + a.wv(x).sum()


@pytest.fixture(scope="module")
def titanish(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """The universal checkpoint of a ucp save (step 2) of a model under torchtitan's names, trained
    2 AdamW steps; and the optimizer state by parameter name."""
    root = tmp_path_factory.mktemp("titanish")
    torch.manual_seed(0)
    model = _Titanish()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(3, DIM)).backward()
        opt.step()
        opt.zero_grad()
    ckpt = ucp.Checkpointer(str(root / "native"), every=1)
    ckpt.maybe_save(2, {"model": model, "optim": opt})
    ckpt.close()
    ucp.convert(str(root / "native"), str(root / "universal"), progress=False)
    names = [n for n, _ in model.named_parameters()]
    states = {names[i]: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}
    return root / "universal", {**states, "model": {k: v.clone() for k, v in model.state_dict().items()}}


def _torch_save_of(folder: Path, tmp_path: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(tmp_path / "whole.pt"))
    return torch.load(tmp_path / "whole.pt", weights_only=True)


def test_torchtitan_target_fuses_the_moments_per_kv_group(titanish, tmp_path: Path) -> None:
    src, want = titanish
    ucp.reshard(str(src), str(tmp_path / "t"), topology="dp=2", engine="torchtitan", spec=f"head_dim = {HEAD_DIM}",
                progress=False)
    got = _torch_save_of(tmp_path / "t" / "step-2", tmp_path)
    p = "layers.0.attention"
    for name, t in want["model"].items():  # model keys flat at the top, wq/wk/wv unfused
        _same(got[name], t, name)
    optim = got["optimizer"]
    assert not any(".wq." in k or ".wk." in k or ".wv." in k for k in optim)
    for state in ("exp_avg", "exp_avg_sq"):
        q, k, v = (want[f"{p}.{w}.weight"][state] for w in ("wq", "wk", "wv"))
        fused = optim[f"state.{p}.wqkv.weight.{state}"]
        per_group = HEADS // KV_HEADS * HEAD_DIM
        for g in range(KV_HEADS):  # group g: its query heads, its key head, its value head
            rows = fused[g * (per_group + 2 * HEAD_DIM):(g + 1) * (per_group + 2 * HEAD_DIM)]
            _same(rows[:per_group], q[g * per_group:(g + 1) * per_group], f"{state} q{g}")
            _same(rows[per_group:per_group + HEAD_DIM], k[g * HEAD_DIM:(g + 1) * HEAD_DIM], f"{state} k{g}")
            _same(rows[per_group + HEAD_DIM:], v[g * HEAD_DIM:(g + 1) * HEAD_DIM], f"{state} v{g}")
        _same(optim[f"state.norm.weight.{state}"], want["norm.weight"][state], f"norm {state}")
    _same(optim[f"state.{p}.wqkv.weight.step"], want[f"{p}.wq.weight"]["step"], "step")
    assert optim[f"param_groups.{p}.wqkv.weight.lr"] == 1e-2
    assert optim["param_groups.norm.bias.betas"] == (0.9, 0.999)
    assert "lr_scheduler" not in got and "train_state" not in got  # the source carries neither
    # ucp reads it back as a torchtitan root: the fused moments cut again give the source's
    back = ucp.convert(str(tmp_path / "t"), str(tmp_path / "u"), spec=f"head_dim = {HEAD_DIM}", progress=False)
    assert back.step == 2 and sorted(back.names()) == sorted(want["model"])
    for name in back.names():
        _same(back.read(name, "fp32"), want["model"][name], name)
        for state in ("exp_avg", "exp_avg_sq"):
            _same(back.read(name, state), want[name][state], f"{name} {state} read back")


def test_torchtitan_target_unfused_with_fuse_qkv_0(titanish, tmp_path: Path) -> None:
    src, want = titanish
    ucp.reshard(str(src), str(tmp_path / "t"), topology="dp=1", engine="torchtitan", spec="fuse_qkv = 0",
                progress=False)
    optim = _torch_save_of(tmp_path / "t" / "step-2", tmp_path)["optimizer"]
    for name in ("layers.0.attention.wk.weight", "norm.bias"):
        for state in ("exp_avg", "exp_avg_sq", "step"):
            _same(optim[f"state.{name}.{state}"], want[name][state], f"{name} {state}")
    assert not any("wqkv" in k for k in optim)


def test_torchtitan_target_refusals_come_before_any_byte(titanish, tmp_path: Path) -> None:
    src, _ = titanish
    out = tmp_path / "t"
    with pytest.raises(ucp.UcpError, match=r"'layers.0.attention.wq.weight'.*fused 'layers.0.attention.wqkv.weight'"
                       r".*--spec 'head_dim = 128'.*--spec 'fuse_qkv = 0'"):
        ucp.reshard(str(src), str(out), topology="dp=2", engine="torchtitan", progress=False)
    with pytest.raises(ucp.UcpError, match="head_dim = 3 does not fit 'layers.0.attention.wqkv.weight'"):
        ucp.reshard(str(src), str(out), topology="dp=2", engine="torchtitan", spec="head_dim = 3", progress=False)
    assert not out.exists()
    (out / "notes.txt").parent.mkdir()
    (out / "notes.txt").write_text("mine")
    r = CliRunner().invoke(main, ["reshard", str(src), str(out), "--to", "dp=1", "--engine", "torchtitan",
                                  "--spec", "fuse_qkv = 0"])
    assert r.exit_code == 1 and "not a torchtitan checkpoint folder (notes.txt)" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_accelerate_target_layout_and_refusals(titanish, tmp_path: Path) -> None:
    src, want = titanish
    out = tmp_path / "a"
    ucp.reshard(str(src), str(out), topology="dp=2", engine="accelerate", progress=False)
    # no scheduler in the source: no scheduler.bin (a job with a scheduler must not call load_state on it)
    assert sorted(p.name for p in out.iterdir()) == ["optimizer_0", "pytorch_model_fsdp_0"]
    model = _torch_save_of(out / "pytorch_model_fsdp_0", tmp_path)
    _same(model, {"model": want["model"]}, "model")
    optim = _torch_save_of(out / "optimizer_0", tmp_path)["optimizer"]
    for name in want["model"]:
        for state in ("exp_avg", "exp_avg_sq", "step"):
            _same(optim["state"][name][state], want[name][state], f"{name} {state}")
    assert [g["params"] for g in optim["param_groups"]] == [list(want["model"])]
    back = ucp.convert(str(out), str(tmp_path / "u"), progress=False)  # an accelerate root to ucp's reader
    for name in want["model"]:
        _same(back.read(name, "exp_avg_sq"), want[name]["exp_avg_sq"], f"{name} read back")
    with pytest.raises(ucp.CheckpointExistsError, match="pytorch_model_fsdp_0 already holds a DCP checkpoint"):
        ucp.reshard(str(src), str(out), topology="dp=1", engine="accelerate", progress=False)
    ucp.reshard(str(src), str(out), topology="dp=1", engine="accelerate", overwrite=True, progress=False)
    (out / "pytorch_model_0.bin").write_bytes(b"x")
    with pytest.raises(ucp.CheckpointExistsError, match=r"not an accelerate save_state folder \(pytorch_model_0.bin\)"):
        ucp.reshard(str(src), str(out), topology="dp=1", engine="accelerate", overwrite=True, progress=False)
