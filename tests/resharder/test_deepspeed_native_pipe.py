"""``ucp.reshard(..., engine="deepspeed")`` for a ``PipelineModule``: DeepSpeed's per-layer and per-stage
ZeRO files (``ucp/engines/deepspeed/_native_pipe.py``), loaded by stock DeepSpeed.

The slow tests train a real ``PipelineModule`` (tied embedding / lm head, a buffer per block, two
param groups, WarmupLR, bf16 ZeRO-1: DeepSpeed's PipelineEngine runs no ZeRO-2/3) with DeepSpeed on
pp=2 x dp=1 or dp=2 (or pp=1) and save it with ``save_checkpoint``; what that engine
holds (DeepSpeed's own ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``, the weights,
buffers, step, LR scheduler) is the truth. ucp reshards the checkpoint for another dp and another pp
(stages computed as the loading job's ``partition_method`` cuts its layers);
a stock pipeline job of that size loads ucp's files with plain ``engine.load_checkpoint``
(``tests/engines/_ds_train_mp.py --load``: no ucp import; its buffers scrambled first) and must hold
every state bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ucp.testing import run_command, scaled_timeout

HERE = Path(__file__).resolve().parent
JOB = HERE.parent / "engines" / "_ds_train_mp.py"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(ranks: int, out: Path, *flags: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(JOB), str(out), "--mode", "pipe", "--scheduler",
           *flags]
    run_command(cmd, what=f"DeepSpeed pipeline job on {ranks} ranks", timeout=scaled_timeout(400))
    gathered = out.with_name(out.name + ".gathered")
    return [torch.load(gathered / f"rank-{r}.pt", weights_only=True) for r in range(ranks)]


def _merged(records: list[dict]) -> dict:
    """Every rank's record by name; a tied parameter held by several stages must agree bit for bit."""
    out = {"params": {}, "buffers": {}, "frozen": {}}
    for rec in records:
        for kind in out:
            for name, value in rec[kind].items():
                if name in out[kind]:
                    _assert_same(out[kind][name], value, f"{kind}.{name} (another rank)")
                else:
                    out[kind][name] = value
    out["step"] = {rec["step"] for rec in records}
    out["lr_scheduler"] = records[0]["lr_scheduler"]
    assert all(rec["lr_scheduler"] == out["lr_scheduler"] for rec in records)
    return out


def _assert_same(want, got, where=""):
    if isinstance(want, dict):
        assert set(want) == set(got), (where, set(want) ^ set(got))
        for k in want:
            _assert_same(want[k], got[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)) and not isinstance(want, torch.Size):
        assert len(want) == len(got), where
        for i, (a, b) in enumerate(zip(want, got)):
            _assert_same(a, b, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert want.dtype == got.dtype and torch.equal(want, got), where
    else:
        assert want == got, (where, want, got)


@pytest.fixture(scope="module")
def pipe_saved(tmp_path_factory):
    """``(dp, pp, layers, partition, *flags) -> (a pp x dp DeepSpeed PipelineModule checkpoint after 3
    steps, what its engine held)``; the default: pp=2, 3 blocks, ``uniform``."""
    pytest.importorskip("deepspeed", reason="install DeepSpeed 0.19.8 to run the real-engine tests")
    cache = {}

    def get(dp: int = 1, pp: int = 2, layers: int = 3, partition: str = "uniform", *flags: str):
        key = (dp, pp, layers, partition, *flags)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"ds-pipe-src-dp{dp}-pp{pp}-l{layers}-{partition}")
            truth = _merged(_job(pp * dp, root / "ckpt", "--pp", str(pp), "--steps", "3", "--layers", str(layers),
                                 "--partition", partition, *flags))
            assert truth["step"] == {3} and truth["lr_scheduler"]["last_batch_iteration"] == 2
            assert "tied_modules.embed.weight" in truth["params"] and truth["buffers"]
            cache[key] = root / "ckpt", truth
        return cache[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("src_dp, pp, dp", [(1, 2, 2), (2, 2, 1), (1, 1, 2)])
def test_stock_pipeline_job_loads_what_ucp_wrote(pipe_saved, tmp_path, src_dp, pp, dp):
    """pp=2 x ``src_dp`` -> pp x dp ZeRO-1: layer files global per layer, optimizer files per (dp
    rank, stage); the loading job holds every state of the saving one bit for bit."""
    import ucp

    src, truth = pipe_saved(src_dp)
    out = tmp_path / "ds"
    ucp.reshard(str(src), str(out), topology=f"pp={pp},dp={dp},zero=1", engine="deepspeed", progress=False)
    tag = out / (out / "latest").read_text()
    names = sorted(p.name for p in tag.iterdir())
    assert [n for n in names if n.startswith("mp_rank")] == [f"mp_rank_{s:02d}_model_states.pt" for s in range(pp)]
    assert sorted(n for n in names if "optim" in n) == sorted(
        f"bf16_zero_pp_rank_{r}_mp_rank_{s:02d}_optim_states.pt" for s in range(pp) for r in range(dp))
    assert sorted(n for n in names if n.startswith("layer_")) == sorted(
        p.name for p in (src / (src / "latest").read_text()).iterdir() if p.name.startswith("layer_"))
    _read_back_equal(src, out)
    seen = _merged(_job(pp * dp, tmp_path / "seen", "--pp", str(pp), "--steps", "0", "--load", str(out)))
    _assert_same(truth, seen)


def _read_back_equal(src: Path, out: Path) -> None:
    """ucp's own DeepSpeed reader finds in ``out`` every state and buffer of ``src``, stage by stage."""
    from ucp.engines.deepspeed._reader import DeepSpeedCheckpoint

    with DeepSpeedCheckpoint(src) as a, DeepSpeedCheckpoint(out) as b:
        first = {}
        for s in range(a.pp_size):
            for n in a.names(mp_rank=s):
                first.setdefault(n, s)
        held = [n for s in range(b.pp_size) for n in b.names(mp_rank=s)]
        assert set(held) == set(first)
        for s in range(b.pp_size):
            for n in b.names(mp_rank=s):
                for state in ("fp32", "exp_avg", "exp_avg_sq", "param"):
                    _assert_same(a.read(n, state, mp_rank=first[n]), b.read(n, state, mp_rank=s), f"{s}:{n}:{state}")
        _assert_same(a.buffers(mp_rank=0), b.buffers(mp_rank=0), "buffers")


@pytest.mark.slow
@pytest.mark.parametrize("source, pp, dp, options", [
    ((1, 2, 5, "parameters"), 3, 1, {}),  # pp=2 -> pp=3, DeepSpeed's default partition_method
    ((2, 2, 5, "parameters"), 4, 1, {}),  # pp=2 x dp=2 -> pp=4 x dp=1
    ((2, 1, 5, "parameters"), 3, 1, {"extra_layers": ["7=embed"]}),  # pp=1 shows no file-less tied lm head
    ((1, 2, 3, "uniform"), 3, 1, {"partition": "uniform"}),  # pp=2 -> pp=3, partition_method="uniform"
    ((1, 2, 4, "parameters", "--stateless"), 3, 1, {}),  # a function (no file), an empty file, a frozen param
], ids=["pp2-pp3", "pp2dp2-pp4dp1", "pp1dp2-pp3dp1-extra-layer", "pp2-pp3-uniform", "pp2-pp3-stateless-layers"])
def test_stock_pipeline_job_loads_another_pp(pipe_saved, tmp_path, source, pp, dp, options):
    """pp -> another pp: each stage holds the layers the loading job's PipelineModule gives it
    (the tied embedding on the first and the last stage); every state bit for bit."""
    import ucp
    from ucp.engines.deepspeed._pipe_partition import balanced_parts, uniform_parts

    src_dp, src_pp, layers, method, *flags = source
    src, truth = pipe_saved(*source)
    out = tmp_path / "ds"
    ucp.reshard(str(src), str(out), topology=f"pp={pp},dp={dp},zero=1", engine="deepspeed", progress=False,
                **options)
    tag = out / (out / "latest").read_text()
    assert sorted(n.name for n in tag.iterdir() if "optim" in n.name) == sorted(
        f"bf16_zero_pp_rank_{r}_mp_rank_{s:02d}_optim_states.pt" for s in range(pp) for r in range(dp))
    embed, block, norm = 61 * 16, 2 * 16 + 16 * 48 + 48 + 48 * 16 + 16, 2 * 16  # trainable elements per layer
    counts = [embed] + [block] * layers + [norm, embed]
    if flags:
        counts[2:2] = [0, 0, 0]  # _halve, nn.Identity, FrozenScale (its parameter is frozen)
        assert set(truth["frozen"]) == {"4.scale"}  # scrambled by the loading job before it loads
        assert (tag / "layer_03-model_states.pt").exists() and not (tag / "layer_02-model_states.pt").exists()
    parts = uniform_parts(len(counts), pp) if method == "uniform" else balanced_parts(counts, pp)
    for s in range(pp):
        shapes = torch.load(tag / f"mp_rank_{s:02d}_model_states.pt", weights_only=True)["param_shapes"]
        held = {n.split(".")[0] for group in shapes for n in group}
        want = {str(i) for i in range(parts[s], parts[s + 1]) if 0 < i < len(counts) - 1 and counts[i]}
        assert held == want | ({"tied_modules"} if s in (0, pp - 1) else set()), (s, parts)
    _read_back_equal(src, out)
    if "extra_layers" in options:  # without it, the last stage would miss the tied lm head
        blind = tmp_path / "blind"
        ucp.reshard(str(src), str(blind), topology=f"pp={pp},dp={dp},zero=1", engine="deepspeed", progress=False)
        last = torch.load(blind / tag.name / f"mp_rank_{pp - 1:02d}_model_states.pt", weights_only=True)
        assert not any(n.startswith("tied_modules.") for group in last["param_shapes"] for n in group)
    seen = _merged(_job(pp * dp, tmp_path / "seen", "--pp", str(pp), "--steps", "0", "--load", str(out),
                        "--layers", str(layers), "--partition", method, *flags))
    _assert_same(truth, seen)


@pytest.mark.slow
def test_universal_pipeline_checkpoint_to_another_pp(pipe_saved, tmp_path):
    """``ucp convert`` keeps the pipeline's layer list in the universal checkpoint: ``ucp reshard``
    writes it for pp=4 (stage boundaries given with ``--partition``), and a stock pp=4 job loads it
    bit for bit."""
    import ucp

    src, truth = pipe_saved(1, 2, 5, "parameters")
    ucp.convert(str(src), str(tmp_path / "u"), progress=False)
    out = tmp_path / "ds"
    from click.testing import CliRunner

    from ucp.cli import main

    result = CliRunner().invoke(main, ["reshard", str(tmp_path / "u"), str(out), "--to", "pp=4,dp=1,zero=1",
                                       "--engine", "deepspeed", "--partition", "0,2,4,5,8", "--quiet"])
    assert result.exit_code == 0, result.output
    _read_back_equal(src, out)
    seen = _merged(_job(4, tmp_path / "seen", "--pp", "4", "--steps", "0", "--load", str(out), "--layers", "5",
                        "--partition", "parameters"))
    _assert_same(truth, seen)


@pytest.mark.slow
@pytest.mark.parametrize("topology, options, words", [
    ("pp=7,dp=1,zero=1", {}, "has 6 layers, and each pipeline stage needs at least one; use pp <= 6"),
    ("pp=2,dp=1,zero=1", {"partition": "0,3,5"}, "ends at layer 5, but the PipelineModule has 6 layers"),
    ("pp=3,dp=1,zero=1", {"partition": "0,3,6"}, "gives 2 stages, the target has pp=3"),
    ("pp=2,dp=1,zero=1", {"partition": "type:Block"}, "records no layer class names"),
    ("pp=2,dp=1,zero=1", {"extra_layers": ["2=embed"]}, "layer 2 has a file in the checkpoint"),
    ("pp=4,dp=1,zero=1", {"partition": "0,1,2,3,6"}, r"pipeline stage 0 \(layers 0 to 0\): optimizer param group 1"),
    ("pp=2,dp=1,zero=2", {}, "ZeRO stage 0 or 1 only"),
    ("pp=2,dp=1,tp=2,zero=1", {}, r"tp=2: the target .* needs pp=1"),
])
def test_refuses_what_a_pipeline_source_cannot_give(pipe_saved, tmp_path, topology, options, words):
    """More stages than layers, boundaries that do not fit, a stage left without a param group:
    refused, naming the constraint, before the destination exists."""
    import ucp

    src, _truth = pipe_saved()
    with pytest.raises(ucp.TopologyError, match=words):
        ucp.reshard(str(src), str(tmp_path / "out"), topology=topology, engine="deepspeed", **options)
    assert not (tmp_path / "out").exists()


# --- fast: refusals before any byte is written ------------------------------------------------------

@pytest.mark.parametrize("topology, words, options", [
    ("pp=2,dp=2,zero=1", "not a DeepSpeed PipelineModule checkpoint", {}),
    ("pp=2,dp=2,zero=3", "PipelineEngine runs ZeRO stage 0 or 1 only", {}),
    ("pp=2,dp=2,zero=2", "PipelineEngine runs ZeRO stage 0 or 1 only", {}),
    ("pp=1,dp=2,zero=1", "is not a DeepSpeed PipelineModule checkpoint: leave them unset", {"partition": "uniform"}),
])
def test_refuses_a_pipeline_it_cannot_place(tmp_path, topology, words, options):
    """A source that does not record which stage holds each layer, ZeRO-2/3 (DeepSpeed runs no
    pipeline with them), and stage options for a source that is no pipeline are refused, naming the
    constraint, before the destination exists."""
    import ucp

    import importlib.util

    spec = importlib.util.spec_from_file_location("ucp_tests_engines_conftest_pipe", HERE.parent / "engines"
                                                  / "conftest.py")
    engines = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engines)
    fake = engines.write_fake_zero(tmp_path / "ds", stage=2, dp=2, groups=[[("a.weight", (3, 5))]], frozen=[])
    with pytest.raises(ucp.TopologyError, match=words):
        ucp.reshard(str(fake.root), str(tmp_path / "out"), topology=topology, engine="deepspeed", **options)
    assert not (tmp_path / "out").exists()


def test_stage_boundaries_are_deepspeeds():
    """ucp's own partition maths gives what DeepSpeed's ``partition_uniform`` / ``partition_balanced``
    give (the ``PipelineModule``'s ``uniform`` and ``parameters`` / ``type:`` methods), including ties,
    zero weights and more stages than layers."""
    import random

    utils = pytest.importorskip("deepspeed.runtime.utils", reason="DeepSpeed gives the reference partition")
    from ucp.engines.deepspeed._pipe_partition import balanced_parts, uniform_parts

    rng = random.Random(15)
    for _ in range(1500):
        n, m = rng.randint(1, 13), rng.randint(1, 7)
        weights = [rng.choice([0, 1, 2, 32, 976, 1632, rng.randint(0, 10_000)]) for _ in range(n)]
        assert balanced_parts(weights, m) == [int(x) for x in utils.partition_balanced(weights, m)], (weights, m)
        assert uniform_parts(n, m) == [int(x) for x in utils.partition_uniform(n, m)], (n, m)


@pytest.mark.parametrize("text, words", [
    ("type:Block", "records no layer class names"),
    ("profile", "neither a method"),
    ("0,3,3,6", "strictly increase"),
    ("1,3,6", "start at 0"),
])
def test_refuses_a_partition_it_cannot_compute(text, words):
    import ucp
    from ucp.engines.deepspeed._pipe_partition import parse_partition

    with pytest.raises(ucp.TopologyError, match=words):
        parse_partition(text)


class _Shapes:
    """Only what the layer list reads of a source: each parameter's shape and frozen flag."""

    url = "mem://pipe"

    def __init__(self, shapes):
        self.shapes = shapes

    def info(self, name):
        from ucp.core._params import ParamInfo

        return ParamInfo(self.shapes[name], torch.bfloat16, ("fp32",), frozen=name.endswith(".frozen"), group=0)


def _record(stages, files, tied_files):
    return {"layer_files": files, "tied_files": tied_files, "stages": stages}


def test_layer_list_shows_file_less_layers():
    """A numbering gap is a function; a tied module a stage holds without its file is a file-less
    TiedLayerSpec placed after that stage's layers (trailing on the last stage); frozen parameters
    and functions count no element; --extra-layer adds what a pp=1 source cannot show."""
    from ucp.engines.deepspeed._native_pipe import _Layers

    shapes = {"tied_modules.e.weight": (10, 4), "1.w": (5, 5), "1.frozen": (7,), "3.w": (3, 3), "4.b": (500,)}
    record = _record([["tied_modules.e.weight", "1.w", "1.frozen"], ["tied_modules.e.weight", "3.w", "4.b"]],
                     [0, 1, 3, 4], {"e": 0})
    layers = _Layers(_Shapes(shapes), record, {})
    assert layers.counts == [40, 25, 0, 9, 500, 40] and layers.tied_at == {0: "e", 5: "e"}
    assert layers.stage_of([0, 2, 4, 6]) == [["tied_modules.e.weight", "1.w", "1.frozen"], ["3.w"],
                                             ["tied_modules.e.weight", "4.b"]]
    layers.check_source("uniform", "src")  # [0, 3, 6]: the source's own stages
    import ucp

    with pytest.raises(ucp.TopologyError, match=r"gives source stage 0 layers 0 to 3, but it held \['3.w'\]"):
        layers.check_source("parameters", "src")  # [0, 4, 6]: not how the source was cut
    from ucp.engines.deepspeed._native_pipe import _stages

    same, parts, _ = _stages(_Shapes(shapes), record, 2, None, ())  # the source's pp: its own stages
    assert parts == [0, 3, 6] and same == record["stages"]
    for pp, partition in ((2, "parameters"), (3, None)):  # asked for, or the default at another pp
        with pytest.raises(ucp.TopologyError, match="gives source stage 0 layers 0 to 3"):
            _stages(_Shapes(shapes), record, pp, partition, ())
    assert _stages(_Shapes(shapes), record, 3, "uniform", ())[1] == [0, 2, 4, 6]
    single = _record([["tied_modules.e.weight", "1.w", "3.w", "4.b"]], [0, 1, 3, 4], {"e": 0})
    assert _Layers(_Shapes(shapes), single, {}).counts == [40, 25, 0, 9, 500]  # the tied head is not seen
    named = _Layers(_Shapes(shapes), single, {5: "e", 6: None})
    assert named.counts == [40, 25, 0, 9, 500, 40, 0] and named.tied_at == {0: "e", 5: "e"}
    with pytest.raises(ucp.TopologyError, match="no tied module 'x'"):
        _Layers(_Shapes(shapes), single, {5: "x"})
    from ucp.engines.deepspeed._native_pipe import _parse_extra

    assert _parse_extra(["7=embed", "8"]) == {7: "embed", 8: None}
    for bad in ("x", "-1", "7="):
        with pytest.raises(ucp.TopologyError, match="expected INDEX"):
            _parse_extra([bad])


def test_partition_is_refused_for_other_engines(tmp_path):
    """``--partition`` / ``--extra-layer`` are the DeepSpeed pipeline target's: another engine refuses
    them before the destination exists (through the CLI)."""
    from click.testing import CliRunner

    from ucp.cli import main

    result = CliRunner().invoke(main, ["reshard", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "dp=2",
                                       "--engine", "ucp", "--partition", "uniform", "--extra-layer", "7=embed"])
    assert result.exit_code != 0 and "engine='ucp' takes neither" in result.output, result.output
    assert not (tmp_path / "out").exists()


def pipe_native_on_ranks(rank, world, src, dst, topology):
    import ucp

    return list(ucp.reshard(src, dst, topology=topology, engine="deepspeed", progress=False).ranks)


@pytest.mark.slow
def test_split_over_torchrun_processes(pipe_saved, tmp_path, run_ranks):
    """Two writing processes share the (stage, dp rank) optimizer files out; every file equals
    what one process writes."""
    import ucp

    src, _truth = pipe_saved()
    results = run_ranks(pipe_native_on_ranks, 2, args=(str(src), str(tmp_path / "two"), "pp=2,dp=2,zero=1"))
    assert [r.value for r in results] == [[0, 2], [1, 3]]
    ucp.reshard(str(src), str(tmp_path / "one"), topology="pp=2,dp=2,zero=1", engine="deepspeed", progress=False)
    files = sorted(p.name for p in (tmp_path / "one" / "global_step3").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two" / "global_step3").iterdir())
    for name in files:
        a, b = (torch.load(tmp_path / d / "global_step3" / name, weights_only=True) for d in ("one", "two"))
        for tree in (a, b):
            if isinstance(tree, dict):
                tree.pop("ucp", None)  # records its source's url
        _assert_same(a, b, name)
    assert (tmp_path / "two" / "latest").read_text() == "global_step3"
