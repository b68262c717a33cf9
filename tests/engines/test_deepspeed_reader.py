"""DeepSpeedCheckpoint against real DeepSpeed checkpoints (slow) and hand-made ones (fast)."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import ucp
from ucp import CheckpointNotFoundError, ConvertError, CorruptCheckpointError, UnsafeInputError
from ucp.engines.deepspeed._files import ALLOWED_GLOBALS, RangeReader
from ucp.engines.deepspeed._reader import DeepSpeedCheckpoint

SMALL_GROUPS = [[("emb.weight", (7, 5)), ("fc.weight", (3, 5))], [("fc.bias", (3,)), ("ln.weight", (5,))]]
REAL = ["z1_fp32_dp2", "z2_bf16_dp2", "z3_bf16_dp2", "z2_bf16_dp3", "z1_bf16opt_dp2", "z3_fp16_dp3"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _load_trusted_stubbed(path):
    """Read a file DeepSpeed wrote (weights_only, with the reader's inert stand-ins allowed)."""
    with torch.serialization.safe_globals([(cls, name) for name, cls in ALLOWED_GLOBALS.items()]):
        return torch.load(path, weights_only=True)


# --- real DeepSpeed checkpoints ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("key", [k for k in REAL if k != "z1_bf16opt_dp2"])
def test_fp32_weights_equal_zero_to_fp32(ds_checkpoint, key):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path, args = ds_checkpoint(key)
    ref = get_fp32_state_dict_from_zero_checkpoint(str(path))
    with DeepSpeedCheckpoint(path) as ckpt:
        buffers, aliases = ckpt.buffers(), ckpt.shared_params()
        assert set(ref) <= set(ckpt.names()) | set(buffers) | set(aliases)
        if args.stage >= 2:  # DeepSpeed's tool leaves ZeRO-1's frozen parameters out; we do not
            assert set(ref) == set(ckpt.names()) | set(buffers) | set(aliases)
        for name, want in ref.items():
            if name in buffers:
                got = buffers[name].float() if buffers[name].is_floating_point() else buffers[name]
            else:
                got = ckpt.read(name, "param" if ckpt.info(name).frozen else "fp32")
            assert got.dtype == want.dtype and torch.equal(got, want), name


@pytest.mark.slow
@pytest.mark.parametrize("key", REAL)
def test_optimizer_states_and_step_equal_ds_to_universal(ds_checkpoint, ds_universal, key):
    path, args = ds_checkpoint(key)
    zero = ds_universal(key)
    common = _load_trusted_stubbed(zero / "optimizer_state.pt")
    with DeepSpeedCheckpoint(path) as ckpt:
        trainable = [n for n in ckpt.names() if not ckpt.info(n).frozen]
        assert trainable
        for name in trainable:
            info = ckpt.info(name)
            assert set(info.states) >= {"fp32", "exp_avg", "exp_avg_sq"}
            for state in ("fp32", "exp_avg", "exp_avg_sq"):
                want = _load_trusted_stubbed(zero / name / f"{state}.pt")
                want = want["param"] if isinstance(want, dict) else want
                assert torch.equal(ckpt.read(name, state), want.view(info.shape)), (name, state)
            if args.stage < 3:  # ds_to_universal writes step.pt for ZeRO-1/2 only
                assert int(_load_trusted_stubbed(zero / name / "step.pt")) == ckpt.step
        if args.stage == 3:
            steps = {int(s["step"]) for s in common["optimizer_state_dict"]["state"].values()}
            assert steps == {ckpt.step}
        assert ckpt.step == args.steps
        assert ckpt.param_groups() == [{k: v for k, v in g.items() if k != "params"}
                                       for g in common["param_groups"]]


@pytest.mark.slow
@pytest.mark.parametrize("key", REAL + ["z0_fp32_dp2"])
def test_frozen_params_buffers_and_metadata(ds_checkpoint, ds_train_module, key):
    path, args = ds_checkpoint(key)
    model = ds_train_module.build_model(args)  # what every rank built before training
    dtype = DTYPES[args.dtype]
    with DeepSpeedCheckpoint(path) as ckpt:
        assert (ckpt.zero_stage, ckpt.dp_size, ckpt.tp_size, ckpt.pp_size) == (args.stage, _ranks(key), 1, 1)
        assert ckpt.dtype == dtype and ckpt.global_steps == args.steps and ckpt.ds_version == "0.19.8"
        named = dict(model.named_parameters(remove_duplicate=False))
        assert ckpt.names() == [n for n in dict(model.named_parameters()) if n in named]
        assert ckpt.shared_params() == ({"head.weight": "wte.weight"} if args.tie else {})
        frozen = [n for n in ckpt.names() if ckpt.info(n).frozen]
        if args.stage > 0:  # ZeRO-0 files do not say which parameters were frozen
            assert frozen == ["wpe"]
        wpe = ckpt.read("wpe", "param")
        assert wpe.dtype == dtype and torch.equal(wpe, model.wpe.detach().to(dtype))
        buffers = ckpt.buffers()
        assert list(buffers) == ["mask", "pos_scale"]
        assert buffers["pos_scale"].dtype == torch.float32  # DeepSpeed casts parameters, not buffers
        for name, want in model.named_buffers():
            assert torch.equal(buffers[name], want.to(buffers[name].dtype)), name
        for name in ckpt.names():
            info = ckpt.info(name)
            assert info.shape == tuple(named[name].shape)
            if not info.frozen and args.stage > 0:
                assert info.group == (0 if args.groups == 1 or named[name].dim() >= 2 else 1)
            if "param" in info.states and "fp32" in info.states:  # the model copy is the master, cast
                assert torch.equal(ckpt.read(name, "param"), ckpt.read(name, "fp32").to(info.dtype)), name
        groups = ckpt.param_groups()
        assert [g["weight_decay"] for g in groups] == ([0.1] if args.groups == 1 else [0.1, 0.0])
        assert all(g["lr"] == args.lr and g["betas"] == (0.9, 0.95) and "params" not in g for g in groups)


def _ranks(key: str) -> int:
    return int(key.rsplit("dp", 1)[1])


@pytest.mark.slow
def test_reads_touch_each_byte_range_once(ds_checkpoint, monkeypatch):
    """Walking names() in order reads exactly the parameter's elements from the optimizer files."""
    path, _ = ds_checkpoint("z2_bf16_dp3")
    reads = []
    original = RangeReader.read_into
    monkeypatch.setattr(RangeReader, "read_into",
                        lambda self, ref, start, out: (reads.append((ref.path, ref.storage_offset_bytes, start,
                                                                     out.numel())), original(self, ref, start, out)))
    with DeepSpeedCheckpoint(path) as ckpt:
        for name in ckpt.names():
            info = ckpt.info(name)
            for state in ("fp32", "exp_avg"):
                if state in info.states:
                    before = len(reads)
                    ckpt.read(name, state)
                    assert sum(n for *_, n in reads[before:]) == torch.Size(info.shape).numel()
    ranges = [r for r in reads if r[3]]
    assert len(ranges) == len(set(ranges))  # no region read twice


# --- hand-made checkpoints: layout rules ------------------------------------------------------------

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stage=st.sampled_from([1, 2, 3]), dp=st.integers(1, 4),
       groups=st.lists(st.lists(shapes, min_size=1, max_size=4), min_size=1, max_size=3),
       frozen=st.lists(shapes, max_size=2), pad=st.booleans())
def test_layout_round_trip(fake_zero, stage, dp, groups, frozen, pad):
    named = [[(f"g{g}.p{i}", s) for i, s in enumerate(grp)] for g, grp in enumerate(groups)]
    paddings = [[(i % 3) if pad and i < len(grp) - 1 else 0 for i in range(len(grp))] for grp in groups]
    fake = fake_zero(stage=stage, dp=dp, groups=named, frozen=[(f"f{i}", s) for i, s in enumerate(frozen)],
                     paddings=None if stage == 3 else paddings)
    with DeepSpeedCheckpoint(fake.root) as ckpt:
        assert (ckpt.zero_stage, ckpt.dp_size, ckpt.step) == (stage, dp, 3)
        assert ckpt.names() == [n for grp in fake.groups for n in grp] + fake.frozen
        for name, states in fake.expected.items():
            info = ckpt.info(name)
            assert info.frozen == (name in fake.frozen)
            for state, want in states.items():
                if state == "param" and stage == 3 and not info.frozen:
                    assert "param" not in info.states  # ZeRO-3 saves no model-dtype copy
                    continue
                assert torch.equal(ckpt.read(name, state), want), (name, state)
        assert all(torch.equal(ckpt.buffers()[k], v) for k, v in fake.buffers.items())
        assert [g["weight_decay"] for g in ckpt.param_groups()] == [0.1 * g for g in range(len(groups))]


def test_tag_directory_and_explicit_tag(fake_zero):
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    for kwargs in ({"path": fake.tag_dir}, {"path": fake.root, "tag": "global_step3"}):
        with DeepSpeedCheckpoint(kwargs.pop("path"), **kwargs) as ckpt:
            assert ckpt.tag == "global_step3" and len(ckpt.names()) == 4
    with pytest.raises(KeyError, match="nope"):
        DeepSpeedCheckpoint(fake.root).info("nope")
    with pytest.raises(ConvertError, match="available: .*exp_avg_sq"):
        DeepSpeedCheckpoint(fake.root).read("fc.bias", "momentum_buffer")


def test_reader_can_be_sent_to_a_worker_process(fake_zero):
    fake = fake_zero(stage=3, dp=2, groups=SMALL_GROUPS, frozen=[("frozen.w", (4, 3))])
    with DeepSpeedCheckpoint(fake.root) as ckpt:
        ckpt.read("emb.weight")  # files are open now
        copy = pickle.loads(pickle.dumps(ckpt))
    assert copy.names() == ckpt.names() and copy.topology == ckpt.topology
    assert torch.equal(copy.read("emb.weight", "exp_avg"), fake.expected["emb.weight"]["exp_avg"])
    assert torch.equal(copy.read("frozen.w", "param"), fake.expected["frozen.w"]["param"])
    copy.close()


# --- bad input -------------------------------------------------------------------------------------

def test_missing_rank_file_is_named(fake_zero):
    fake = fake_zero(stage=2, dp=3, groups=SMALL_GROUPS)
    (fake.tag_dir / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointNotFoundError, match="bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        DeepSpeedCheckpoint(fake.root)


def test_missing_zero3_model_file_is_named(fake_zero):
    fake = fake_zero(stage=3, dp=2, groups=SMALL_GROUPS)
    (fake.tag_dir / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointNotFoundError, match="zero_pp_rank_1_mp_rank_00_model_states.pt"):
        DeepSpeedCheckpoint(fake.root)


def test_mismatched_world_sizes(fake_zero):
    two = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    three = fake_zero(stage=2, dp=3, groups=SMALL_GROUPS)
    stray = three.tag_dir / "bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"
    os.replace(stray, two.tag_dir / stray.name)  # a file of a 3-rank run among a 2-rank run's
    with pytest.raises(CorruptCheckpointError, match="bf16_zero_pp_rank_2_mp_rank_00_optim_states.pt"):
        DeepSpeedCheckpoint(two.root)
    os.replace(three.tag_dir / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
               two.tag_dir / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (two.tag_dir / stray.name).unlink()
    with pytest.raises(CorruptCheckpointError, match="bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        DeepSpeedCheckpoint(two.root)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_named(fake_zero, keep):
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    victim = fake.tag_dir / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CorruptCheckpointError, match=str(victim)):
        DeepSpeedCheckpoint(fake.root)


def test_file_shorter_than_its_metadata(fake_zero, tmp_path):
    """Tensor bytes cut out of the middle of a zip (its directory intact) are caught when read."""
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    victim = fake.tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(victim) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    big = max((n for n in entries if "/data/" in n), key=lambda n: len(entries[n]))
    entries[big] = entries[big][:8]
    with zipfile.ZipFile(victim, "w", zipfile.ZIP_STORED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    with pytest.raises(CorruptCheckpointError, match=str(victim)):
        with DeepSpeedCheckpoint(fake.root) as ckpt:
            for name in ckpt.names():
                ckpt.read(name, "exp_avg" if not ckpt.info(name).frozen else "param")


def test_metadata_that_does_not_fit_the_partitions(fake_zero):
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    model = fake.tag_dir / "mp_rank_00_model_states.pt"
    sd = torch.load(model, weights_only=True)
    sd["param_shapes"][0]["emb.weight"] = torch.Size([70, 5])
    torch.save(sd, model)
    with pytest.raises(CorruptCheckpointError, match="fp32 partition of group 0"):
        DeepSpeedCheckpoint(fake.root)


@pytest.mark.parametrize("damage", ["no_param_groups", "groups_not_a_list", "no_fp32"])
def test_unexpected_structure_is_a_corrupt_checkpoint(fake_zero, damage):
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    victim = fake.tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    sd = torch.load(victim, weights_only=True)
    osd = sd["optimizer_state_dict"]
    if damage == "no_param_groups":
        del osd["base_optimizer_state"]["param_groups"]
    elif damage == "groups_not_a_list":
        osd["single_partition_of_fp32_groups"] = 7
    else:
        del osd["single_partition_of_fp32_groups"]
    torch.save(sd, victim)
    with pytest.raises(CorruptCheckpointError):
        DeepSpeedCheckpoint(fake.root)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("form", ["torch_zip", "raw_pickle"])
def test_pickle_payload_is_refused_without_running(fake_zero, tmp_path, form):
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    marker = tmp_path / "payload-ran"
    victim = fake.tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    evil = {"optimizer_state_dict": {"zero_stage": 2, "partition_count": [2, 2], "x": _Payload(marker)}}
    if form == "torch_zip":
        torch.save(evil, victim)
    else:
        victim.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(UnsafeInputError, match=str(victim)):
        DeepSpeedCheckpoint(fake.root)
    assert not marker.exists()


def test_payload_through_an_allowed_name_is_refused(fake_zero, tmp_path, monkeypatch):
    """A pickle that calls an allowed stand-in with hostile arguments still runs nothing."""
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    victim = fake.tag_dir / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"

    class Stage:
        def __reduce__(self):
            return (Stage, ("rm -rf /",))

    Stage.__module__, Stage.__qualname__ = "deepspeed.runtime.zero.config", "ZeroStageEnum"
    import sys
    import types
    for mod in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero", "deepspeed.runtime.zero.config"):
        if mod not in sys.modules:  # stand-ins only while pickling (restored after the test: a
            monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))  # spec-less module breaks find_spec)
    monkeypatch.setattr(sys.modules["deepspeed.runtime.zero.config"], "ZeroStageEnum", Stage, raising=False)
    torch.save({"optimizer_state_dict": {"zero_stage": Stage(), "partition_count": [2, 2]}}, victim)
    monkeypatch.undo()
    with pytest.raises((UnsafeInputError, CorruptCheckpointError), match=str(victim)):
        DeepSpeedCheckpoint(fake.root)


def test_tag_that_leaves_the_directory_is_refused(fake_zero):
    fake = fake_zero(stage=1, dp=1, groups=SMALL_GROUPS)
    (fake.root / "latest").write_text("../../etc")
    with pytest.raises(UnsafeInputError, match="latest"):
        DeepSpeedCheckpoint(fake.root)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        DeepSpeedCheckpoint(tmp_path / "absent")
    with pytest.raises(CheckpointNotFoundError, match="latest"):
        DeepSpeedCheckpoint(tmp_path)


def test_moe_without_zero_is_refused_and_auto_detect_says_why(fake_zero, tmp_path):
    """MoE under ZeRO 1/2 converts (test_convert_deepspeed_mp.py); without ZeRO, DeepSpeed writes whole
    optimizers per expert-parallel rank, which is refused with the reason (also by auto-detect)."""
    fake = fake_zero(stage=2, dp=1, groups=SMALL_GROUPS)
    (fake.tag_dir / "expp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ConvertError, match="MoE checkpoint saved without ZeRO"):
        DeepSpeedCheckpoint(fake.root)
    with pytest.raises(ConvertError, match="closest: deepspeed: .*MoE checkpoint saved without ZeRO"):
        ucp.convert(str(fake.root), str(tmp_path / "u"))


# --- model-parallel file naming --------------------------------------------------------------------

def _as_two_mp_ranks(fake, *, tp: int, pp: int):
    """Copy mp rank 0's files as mp rank 1 and record tp/pp: a 2-way model-parallel layout."""
    for src in list(fake.tag_dir.iterdir()):
        sd = torch.load(src, weights_only=True)
        if "checkpoint_parallel_dimensions" in sd:
            sd["checkpoint_parallel_dimensions"] = {"tp_degree": tp, "pp_degree": pp}
        torch.save(sd, src)
        torch.save(sd, src.with_name(src.name.replace("mp_rank_00", "mp_rank_01")))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_model_parallel_ranks_are_listed_and_read(fake_zero, tp, pp):
    fake = fake_zero(stage=2, dp=2, groups=SMALL_GROUPS)
    _as_two_mp_ranks(fake, tp=tp, pp=pp)
    (fake.tag_dir / "layer_01-model_00-model_states.pt").write_bytes(b"")
    with DeepSpeedCheckpoint(fake.root) as ckpt:
        assert (ckpt.tp_size, ckpt.pp_size, ckpt.mp_size, ckpt.dp_size) == (tp, pp, 2, 2)
        assert len(ckpt.files()["optim"]) == 4 and len(ckpt.files()["model"]) == 2
        assert list(ckpt.layer_files()) == [(1, "model_00")]
        with pytest.raises(ConvertError, match="UCL spec"):
            ckpt.names()
        for mp in (0, 1):
            assert torch.equal(ckpt.read("emb.weight", "exp_avg", mp_rank=mp), fake.expected["emb.weight"]["exp_avg"])
    (fake.tag_dir / "mp_rank_01_model_states.pt").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"mp rank\(s\) \[1\]"):
        DeepSpeedCheckpoint(fake.root)
