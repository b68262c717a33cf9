"""Fixtures for the engine readers: real DeepSpeed checkpoints, and small hand-made ones.

``ds_checkpoint(key)`` trains a tiny GPT with real DeepSpeed (``_ds_train.py`` under torchrun, CPU +
gloo) and saves a checkpoint, once per session per configuration; ``ds_universal(key)`` runs
DeepSpeed's own ``ds_to_universal`` on it. Both are for ``@pytest.mark.slow`` tests.

``fake_zero`` writes a checkpoint with DeepSpeed's file layout from known tensors, without DeepSpeed
(plain types only), for fast tests of the layout rules and of bad input.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import socket
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ucp.testing import run_command, scaled_timeout

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "_ds_train.py"
LAUNCH_TIMEOUT_S = 300  # a first run also JIT-builds DeepSpeed's CPU shared-memory op (~30 s);
# on a quiet machine: scaled with the machine's load (ucp.testing.scaled_timeout)

#: key -> (ranks, training script flags)
DS_CONFIGS: dict[str, tuple[int, list[str]]] = {
    "z1_fp32_dp2": (2, ["--stage", "1", "--dtype", "fp32", "--groups", "2"]),
    "z2_bf16_dp2": (2, ["--stage", "2", "--dtype", "bf16", "--groups", "2", "--tie"]),
    "z3_bf16_dp2": (2, ["--stage", "3", "--dtype", "bf16", "--groups", "2", "--tie"]),
    "z2_bf16_dp3": (3, ["--stage", "2", "--dtype", "bf16"]),
    # ZeRO-1 + bf16 with fp32 gradient accumulation: DeepSpeed's BF16_Optimizer and its own layout.
    "z1_bf16opt_dp2": (2, ["--stage", "1", "--dtype", "bf16", "--grad-accum-dtype", "fp32", "--tie"]),
    "z3_fp16_dp3": (3, ["--stage", "3", "--dtype", "fp16", "--groups", "2"]),
    "z0_fp32_dp2": (2, ["--stage", "0", "--dtype", "fp32"]),
    # trains 6 steps, saving after step 3, and logs every step's loss (the cross-engine continuity test)
    "z2_fp32_dp2_losses": (2, ["--stage", "2", "--dtype", "fp32", "--groups", "2", "--steps", "6",
                               "--save-at", "3", "--loss-log"]),
    "z2_bf16_dp2_losses": (2, ["--stage", "2", "--dtype", "bf16", "--groups", "2", "--steps", "6",
                               "--save-at", "3", "--loss-log"]),
}


def load_helper(name: str, path: Path | None = None):
    """A helper script of this folder (``_<name>.py``) as a module: tests run with
    ``--import-mode=importlib``, so its files do not import each other by name."""
    spec = importlib.util.spec_from_file_location(f"ucp_tests{name}", path or HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_train_module():
    """``_ds_train.py`` as a module (its model builder and argument parser; no DeepSpeed import)."""
    return load_helper("_ds_train", TRAIN)


@pytest.fixture(scope="session")
def framework_job(tmp_path_factory):
    """``framework_job(helper, fn, package) -> Path``: runs ``fn`` of helper script ``helper`` on 2
    ranks (``ucp.testing.run_ranks``) with a fresh output folder; skips without ``package``."""
    def run(helper: str, fn: str, package: str) -> Path:
        pytest.importorskip(package, reason=f"install the test extra ({package}; see the Makefile)")
        from ucp.testing import run_ranks

        out = tmp_path_factory.mktemp(package)
        run_ranks(getattr(load_helper(helper), fn), 2, args=(str(out),), timeout=600)
        return out
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], what: str, timeout: int = LAUNCH_TIMEOUT_S) -> None:
    try:  # a private TORCH_EXTENSIONS_DIR (see subprocess_env); stderr in a timeout's message
        run_command(cmd, what=what, timeout=scaled_timeout(timeout))
    except AssertionError as e:
        pytest.fail(str(e))


def train_and_save(out: Path, ranks: int, flags: list[str]) -> Path:
    """Run ``_ds_train.py`` on ``ranks`` local processes (torchrun, loopback rendezvous)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TRAIN), str(out), *flags]
    _run(cmd, f"DeepSpeed training ({' '.join(flags)})")
    return out


@pytest.fixture(scope="session")
def ds_checkpoint(tmp_path_factory):
    """``ds_checkpoint(key) -> (save_dir, args)``: a real DeepSpeed checkpoint, made once per session."""
    pytest.importorskip("deepspeed", reason="install DeepSpeed 0.19.8 to run the real-checkpoint tests")
    cache: dict[str, tuple[Path, object]] = {}
    train = load_train_module()

    def get(key: str):
        if key not in cache:
            ranks, flags = DS_CONFIGS[key]
            out = train_and_save(tmp_path_factory.mktemp(f"ds-{key}") / "ckpt", ranks, flags)
            cache[key] = (out, train.parse_args([str(out), *flags]))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def ds_universal(ds_checkpoint, tmp_path_factory):
    """``ds_universal(key) -> Path``: DeepSpeed's ``ds_to_universal`` output (its ``zero/`` folder)."""
    cache: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in cache:
            src, _ = ds_checkpoint(key)
            tag = (src / "latest").read_text().strip()
            out = tmp_path_factory.mktemp(f"dsu-{key}") / tag
            _run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src / tag),
                  "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                 f"ds_to_universal on {key}")
            cache[key] = out / "zero"
        return cache[key]

    return get


#: key -> (ranks, _ds_train_mp.py flags): DeepSpeed's model-parallel features (2 ranks; 4 for pp x dp
#: and for experts partitioned over expert-data-parallel ranks)
DS_MP_CONFIGS: dict[str, tuple[int, list[str]]] = {
    "pipe_pp2": (2, ["--mode", "pipe", "--pp", "2"]),
    "pipe_pp2_dp2": (4, ["--mode", "pipe", "--pp", "2"]),
    "autotp_tp2": (2, ["--mode", "autotp", "--heads", "4", "--kv-heads", "2"]),
    "autotp_tp2_uneven": (2, ["--mode", "autotp", "--heads", "6", "--kv-heads", "3"]),
    "moe_ep2_z2": (2, ["--mode", "moe", "--experts", "4", "--ep", "2"]),
    # experts partitioned over expert-data-parallel groups of 2 ranks ([0, 2] and [1, 3])
    "moe_ep2_dp4_z2": (4, ["--mode", "moe", "--experts", "4", "--ep", "2"]),
    # the same with DeepSpeed's data-before-expert order: groups [0, 1] and [2, 3]
    "moe_ep2_dp4_z2_dbe": (4, ["--mode", "moe", "--experts", "4", "--ep", "2", "--data-before-expert"]),
}


@pytest.fixture(scope="session")
def ds_mp_checkpoint(tmp_path_factory):
    """``ds_mp_checkpoint(key) -> (save_dir, gathered_dir)``: a real pipeline / AutoTP / MoE DeepSpeed
    checkpoint, and what DeepSpeed itself gathered for each rank's parameters, made once per session."""
    pytest.importorskip("deepspeed", reason="install DeepSpeed 0.19.8 to run the real-checkpoint tests")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(key: str) -> tuple[Path, Path]:
        if key not in cache:
            ranks, flags = DS_MP_CONFIGS[key]
            out = tmp_path_factory.mktemp(f"ds-{key}") / "ckpt"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), str(HERE / "_ds_train_mp.py"), str(out), *flags]
            _run(cmd, f"DeepSpeed training ({' '.join(flags)})")
            cache[key] = (out, out.with_name("ckpt.gathered"))
        return cache[key]

    return get


# --- hand-made checkpoints with DeepSpeed's layout -------------------------------------------------

@dataclasses.dataclass
class FakeCheckpoint:
    root: Path
    tag_dir: Path
    expected: dict[str, dict[str, torch.Tensor]]  # name -> state -> tensor
    buffers: dict[str, torch.Tensor]
    groups: list[list[str]]
    frozen: list[str]


def _states(shape, gen) -> dict[str, torch.Tensor]:
    fp32 = torch.randn(shape, generator=gen)
    return {"fp32": fp32, "param": fp32.to(torch.bfloat16), "exp_avg": torch.randn(shape, generator=gen),
            "exp_avg_sq": torch.rand(shape, generator=gen)}


def _zero12_files(expected, groups, dp, paddings, stage):
    """Per-rank optimizer dicts: each group flattened (with paddings), aligned to 2*dp, cut in dp parts."""
    per_rank = [{"fp32": [], "state": {}} for _ in range(dp)]
    for g, names in enumerate(groups):
        flats = {s: [] for s in ("fp32", "exp_avg", "exp_avg_sq")}
        for i, name in enumerate(names):
            for s in flats:
                flats[s].append(expected[name][s].reshape(-1))
                flats[s].append(torch.zeros(paddings[g][i]))
        total = sum(t.numel() for t in flats["fp32"])
        part = math.ceil(total / (2 * dp)) * 2 * dp // dp
        for s, pieces in flats.items():
            flat = torch.cat(pieces + [torch.zeros(part * dp - total)])
            for r in range(dp):
                chunk = flat[r * part:(r + 1) * part].clone()
                if s == "fp32":  # DeepSpeed drops the alignment tail from the saved fp32 partition
                    chunk = chunk[:max(0, min(part, total - r * part))].clone()
                    per_rank[r]["fp32"].append(chunk)
                else:
                    per_rank[r]["state"].setdefault(g, {"step": torch.tensor(3.0)})[s] = chunk
    return [{"optimizer_state_dict": {
        "zero_stage": stage, "partition_count": [dp] * len(groups),
        "single_partition_of_fp32_groups": pr["fp32"], "param_alignment_paddings": paddings,
        "base_optimizer_state": {"state": pr["state"], "param_groups": [
            {"lr": 1e-3, "weight_decay": 0.1 * g, "params": [g]} for g in range(len(groups))]}},
        "ds_version": "fake"} for pr in per_rank]


def _zero3_parts(t: torch.Tensor, dp: int) -> list[torch.Tensor]:
    q = math.ceil(t.numel() / dp)
    flat = torch.cat([t.reshape(-1), torch.zeros(q * dp - t.numel(), dtype=t.dtype)])
    return [flat[r * q:(r + 1) * q].clone() for r in range(dp)]


def _zero3_files(expected, groups, dp):
    per_rank = [{"fp32": [], "state": {}} for _ in range(dp)]
    for g, names in enumerate(groups):
        for s in ("fp32", "exp_avg", "exp_avg_sq"):
            parts = [_zero3_parts(expected[n][s], dp) for n in names]
            for r in range(dp):
                flat = torch.cat([p[r] for p in parts])
                if s == "fp32":
                    per_rank[r]["fp32"].append(flat)
                else:
                    per_rank[r]["state"].setdefault(g, {"step": torch.tensor(3.0)})[s] = flat
    return [{"optimizer_state_dict": {
        "zero_stage": 3, "partition_count": dp, "fp32_flat_groups": pr["fp32"],
        "optimizer_state_dict": {"state": pr["state"], "param_groups": [
            {"lr": 1e-3, "weight_decay": 0.1 * g, "params": [g]} for g in range(len(groups))]}},
        "ds_version": "fake"} for pr in per_rank]


def write_fake_zero(root: Path, *, stage: int, dp: int, groups: list[list[tuple[str, tuple]]],
                    frozen: list[tuple[str, tuple]] = (), paddings: list[list[int]] | None = None,
                    seed: int = 0, tag: str = "global_step3") -> FakeCheckpoint:
    """Write a ZeRO-``stage`` checkpoint of ``dp`` ranks with DeepSpeed's layout; return what it holds."""
    gen = torch.Generator().manual_seed(seed)
    expected = {n: _states(s, gen) for grp in groups for n, s in grp}
    expected.update({n: {"param": torch.randn(s, generator=gen).to(torch.bfloat16)} for n, s in frozen})
    buffers = {"mask": torch.ones(3, 3, dtype=torch.bool), "scale": torch.linspace(0, 1, 5)}
    names = [[n for n, _ in grp] for grp in groups]
    paddings = paddings or [[0] * len(grp) for grp in groups]
    shapes = [OrderedDict((n, torch.Size(s)) for n, s in grp) for grp in groups]
    module = OrderedDict()
    for n in [n for grp in names for n in grp] + [n for n, _ in frozen]:
        module[n] = torch.empty(0, dtype=torch.bfloat16) if stage == 3 else expected[n]["param"]
    module.update(buffers)
    model = {"module": module, "buffer_names": list(buffers), "param_shapes": shapes, "shared_params": {},
             "frozen_param_shapes": OrderedDict((n, torch.Size(s)) for n, s in frozen) or None,
             "dp_world_size": dp, "mp_world_size": 1, "global_steps": 3, "ds_version": "fake",
             "checkpoint_parallel_dimensions": {"tp_degree": 1, "pp_degree": 1}, "ds_config": {"bf16": {"enabled": True}}}
    tag_dir = root / tag
    tag_dir.mkdir(parents=True)
    (root / "latest").write_text(tag)
    if stage == 3:
        optims = _zero3_files(expected, names, dp)
        for r in range(dp):
            frags = OrderedDict((n, _zero3_parts(expected[n]["param"], dp)[r]) for n, _ in frozen)
            torch.save({**model, "frozen_param_fragments": frags or None},
                       tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
    else:
        optims = _zero12_files(expected, names, dp, paddings, stage)
        frags = OrderedDict((n, expected[n]["param"]) for n, _ in frozen)
        torch.save({**model, "frozen_param_fragments": frags or None}, tag_dir / "mp_rank_00_model_states.pt")
    for r, osd in enumerate(optims):
        torch.save(osd, tag_dir / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return FakeCheckpoint(root, tag_dir, expected, buffers, names, [n for n, _ in frozen])


@pytest.fixture
def fake_zero(tmp_path):
    """``fake_zero(stage=2, dp=2, groups=..., frozen=..., paddings=...) -> FakeCheckpoint`` under tmp_path."""
    counter = iter(range(1_000_000))

    def make(**kw) -> FakeCheckpoint:
        return write_fake_zero(tmp_path / f"fake{next(counter)}", **kw)

    return make



@pytest.fixture(scope="session")
def ds_train_module():
    """The ``_ds_train.py`` module: ``build_model(args)`` gives the model every rank started from."""
    return load_train_module()
