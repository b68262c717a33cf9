"""Roots of DCP directories (torchtitan's ``step-N/``, accelerate's model + optimizer folders) and
torchtitan's flat layout with a fused ``wqkv``, on small checkpoints saved in this process with
``dcp.save`` in the frameworks' key layouts (the real frameworks: ``test_dcp_frameworks.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner

from ucp.core._errors import CheckpointNotFoundError, ConvertError, CorruptCheckpointError
from ucp.cli import main
from ucp.engines.dcp._reader import DcpCheckpoint, detect

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_torchtitan_folder_takes_the_newest_complete_step(tmp_path: Path) -> None:
    dump = tmp_path / "outputs"  # torchtitan's job.dump_folder; checkpoint.folder's default below
    root = dump / "checkpoint"
    for step in (9, 10, 11):
        dcp.save({"w": torch.full((3,), float(step)), "train_state": {"step": step}},
                 checkpoint_id=str(root / f"step-{step}"))
    (root / "step-11" / ".metadata").unlink()  # an interrupted save: DCP writes .metadata last
    (root / "step-x").mkdir()
    assert detect(root) == "torchtitan checkpoint folder: 2 step(s) (9, 10), newest step-10"
    newest = DcpCheckpoint(root)
    assert newest.root.step == 10 and torch.equal(newest.read("w"), torch.full((3,), 10.0))
    assert newest.step == 10  # no optimizer step saved: the folder's
    assert newest.extras() == {"train_state": {"step": 10}}
    older = DcpCheckpoint(root, tag="step-9")
    assert torch.equal(older.read("w"), torch.full((3,), 9.0))
    with pytest.raises(CheckpointNotFoundError, match=r"no complete torchtitan step '11'.* 9, 10"):
        DcpCheckpoint(root, tag="11")
    assert detect(dump) == "torchtitan checkpoint folder checkpoint/: 2 step(s) (9, 10), newest step-10"
    doc = json.loads(CliRunner().invoke(main, ["inspect", str(dump), "--json"]).stdout)
    step_10 = [f for f in (root / "step-10").iterdir()]
    assert (doc["step"], doc["files"]) == (10, len(step_10))  # that step's files, not the others'
    assert doc["size_on_disk"] == sum(f.stat().st_size for f in step_10)
    assert torch.equal(DcpCheckpoint(dump, tag="9").read("w"), torch.full((3,), 9.0))


def test_unfinished_roots_are_named_by_auto_detection(tmp_path: Path) -> None:
    dcp.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "titan" / "step-3"))
    (tmp_path / "titan" / "step-3" / ".metadata").unlink()
    dcp.save({"optimizer": {"x": torch.ones(2)}}, checkpoint_id=str(tmp_path / "accel" / "optimizer_0"))
    for root, why in (("titan", "1 torchtitan step folder(s) (step-3) but none holds .metadata"),
                      ("accel", "accelerate's optimizer_0/ but no pytorch_model_fsdp_<i>/ beside it")):
        r = CliRunner().invoke(main, ["convert", str(tmp_path / root), str(tmp_path / "out")])
        assert r.exit_code == 1 and f"closest: dcp: {why}" in r.output, r.output


class LoaderState:
    """A data loader's state as a custom class: torch.load(weights_only=True) refuses it."""

    def __init__(self) -> None:
        self.position = 3


def test_extras_leave_out_a_value_that_cannot_be_loaded_safely(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    dcp.save({"w": torch.ones(2), "train_state": {"step": 5}, "dataloader": {"rank0": LoaderState()}},
             checkpoint_id=str(tmp_path / "step-5"))
    assert DcpCheckpoint(tmp_path).extras() == {"train_state": {"step": 5}}
    assert "'dataloader.rank0' left out of the extras" in caplog.text


def _model_and_optim() -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return get_state_dict(model, opt)


def test_accelerate_folder_reads_model_and_optimizer_folders_as_one(tmp_path: Path) -> None:
    model_sd, optim_sd = _model_and_optim()
    dcp.save({"model": model_sd}, checkpoint_id=str(tmp_path / "pytorch_model_fsdp_0"))
    dcp.save({"optimizer": optim_sd}, checkpoint_id=str(tmp_path / "optimizer_0"))
    torch.save({"last_epoch": 3, "base_lrs": [0.1]}, tmp_path / "scheduler.bin")
    assert detect(tmp_path) == "accelerate FSDP save_state: pytorch_model_fsdp_0/ + optimizer_0/"
    ckpt = DcpCheckpoint(tmp_path)
    assert ckpt.names() == list(model_sd) and ckpt.step == 1
    for name, t in model_sd.items():
        assert torch.equal(ckpt.read(name), t)
        assert torch.equal(ckpt.read(name, "exp_avg"), optim_sd["state"][name]["exp_avg"])
    assert ckpt.extras() == {"scheduler": {"last_epoch": 3, "base_lrs": [0.1]}}
    with pytest.raises(ConvertError, match=r"no model section.*convert the folder above it"):
        DcpCheckpoint(tmp_path / "optimizer_0")
    dcp.save({"model": model_sd}, checkpoint_id=str(tmp_path / "pytorch_model_fsdp_1"))
    with pytest.raises(ConvertError, match="save_state of 2 models"):
        DcpCheckpoint(tmp_path)


def test_accelerate_folders_saving_one_key_twice_are_refused(tmp_path: Path) -> None:
    model_sd, _ = _model_and_optim()
    dcp.save({"model": model_sd}, checkpoint_id=str(tmp_path / "pytorch_model_fsdp_0"))
    dcp.save({"model": model_sd}, checkpoint_id=str(tmp_path / "optimizer_0"))
    with pytest.raises(CorruptCheckpointError, match="both save 'model.0.weight'"):
        DcpCheckpoint(tmp_path)


# -- torchtitan's flat layout with a fused attention projection ---------------------------------
KV, Q_PER_KV, HEAD, DIM = 2, 3, 4, 5


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The fused layout as torchtitan describes it: per KV group, its query heads, its key, its value."""
    rows = []
    for g in range(KV):
        rows += [q[g * Q_PER_KV * HEAD:(g + 1) * Q_PER_KV * HEAD], k[g * HEAD:(g + 1) * HEAD],
                 v[g * HEAD:(g + 1) * HEAD]]
    return torch.cat(rows)


def _titan_like(path: Path) -> dict[str, torch.Tensor]:
    """``{**model, "optimizer": flattened, "lr_scheduler": ...}`` with ``a.wqkv`` trained fused."""
    torch.manual_seed(1)
    parts = {"wq": (KV * Q_PER_KV * HEAD, DIM), "wk": (KV * HEAD, DIM), "wv": (KV * HEAD, DIM)}
    model = {f"a.{p}.weight": torch.randn(shape) for p, shape in parts.items()}
    model["norm.weight"] = torch.randn(DIM)
    moments = {f"a.{p}.weight": torch.rand(shape) for p, shape in parts.items()}
    optim = {"state.a.wqkv.weight.exp_avg_sq": _grouped(*moments.values()),
             "state.a.wqkv.weight.step": torch.tensor(7.0),
             "state.norm.weight.exp_avg_sq": torch.rand(DIM), "state.norm.weight.step": torch.tensor(7.0),
             "param_groups.a.wqkv.weight.lr": 0.01, "param_groups.norm.weight.lr": 0.02}
    dcp.save({**model, "optimizer": optim, "lr_scheduler": {"last_epoch": 7}},
             checkpoint_id=str(path / "step-7"))
    return moments


def test_fused_wqkv_states_are_cut_onto_the_saved_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moments = _titan_like(tmp_path)
    ckpt = DcpCheckpoint(tmp_path, head_dim=HEAD)
    assembled: list[str] = []
    real = DcpCheckpoint._assemble
    monkeypatch.setattr(DcpCheckpoint, "_assemble", lambda self, e: assembled.append(e.key) or real(self, e))
    assert ckpt.names() == ["a.wq.weight", "a.wk.weight", "a.wv.weight", "norm.weight"]
    for name, want in moments.items():  # as a conversion reads them: one part after the other
        assert ckpt.info(name).states == ("param", "fp32", "exp_avg_sq")
        assert torch.equal(ckpt.read(name, "exp_avg_sq"), want)
    # the fused state is read once for its three parts, and let go once all three were taken
    assert assembled == ["optimizer.state.a.wqkv.weight.exp_avg_sq"] and not ckpt._fused._entries
    for name, want in moments.items():
        assert torch.equal(ckpt.read(name, "exp_avg_sq", region=((1, 3), (0, 2))), want[1:3, :2])
    groups = ckpt.param_groups()
    assert [groups[ckpt.info(n).group]["lr"] for n in ckpt.names()] == [0.01, 0.01, 0.01, 0.02]
    assert ckpt.step == 7 and ckpt.extras() == {"lr_scheduler": {"last_epoch": 7}}


def test_fused_wqkv_needs_a_head_size_that_fits(tmp_path: Path) -> None:
    _titan_like(tmp_path)
    ckpt = DcpCheckpoint(tmp_path)  # listed and inspected without one
    assert ckpt.info("a.wk.weight").states == ("param", "fp32", "exp_avg_sq")
    assert torch.equal(ckpt.read("norm.weight", "fp32"), ckpt.read("norm.weight", "param"))
    with pytest.raises(ConvertError, match=r"does not record the head size.*--spec 'head_dim = 128'"):
        ckpt.read("a.wk.weight", "exp_avg_sq")
    with pytest.raises(ConvertError, match="head_dim = 3 does not fit"):
        DcpCheckpoint(tmp_path, head_dim=3).read("a.wq.weight", "exp_avg_sq")


def test_roots_on_s3(tmp_path: Path, s3_url: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_url
    model_sd, optim_sd = _model_and_optim()
    dcp.save({"model": model_sd}, checkpoint_id=str(tmp_path / "acc" / "pytorch_model_fsdp_0"))
    dcp.save({"optimizer": optim_sd}, checkpoint_id=str(tmp_path / "acc" / "optimizer_0"))
    moments = _titan_like(tmp_path / "titan")
    fs = fsspec.filesystem("s3", **options)
    fs.put(str(tmp_path) + "/", url[len("s3://"):] + "/", recursive=True)
    acc = DcpCheckpoint(f"{url}/acc", storage_options=options)
    assert acc.root.kind == "accelerate" and torch.equal(acc.read("0.weight", "exp_avg"),
                                                         optim_sd["state"]["0.weight"]["exp_avg"])
    titan = DcpCheckpoint(f"{url}/titan", storage_options=options, head_dim=HEAD)
    assert titan.root.step == 7 and torch.equal(titan.read("a.wv.weight", "exp_avg_sq"), moments["a.wv.weight"])


def test_fused_cache_holds_at_most_its_capacity() -> None:
    from ucp.engines.dcp._fused import FusedCache, FusedPart
    from ucp.engines.dcp._meta import TensorEntry

    parts = [FusedPart(TensorEntry(f"s{i}", (f"s{i}",), (6, 1), torch.float32, ()), 0, 2, 2) for i in range(3)]
    cache, loads = FusedCache(capacity=2), []
    for p in parts:
        cache.take(p, lambda p=p: loads.append(p.source.key) or torch.zeros(6, 1))
    assert list(cache._entries) == ["s1", "s2"]  # the oldest left
    cache.take(parts[0], lambda: loads.append("again") or torch.zeros(6, 1))
    assert loads == ["s0", "s1", "s2", "again"]
