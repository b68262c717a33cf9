"""Save at topology A, load at B: a Megatron-style Llama saved on tp=2 x pp=2 ranks is resharded
onto a grid of (dp, tp, pp, zero) targets; every tensor of every target rank equals, bit for bit,
the reference cut (``_ref.py``, written without UCL) of the consolidated tensors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import ucp
from ucp.grammar import bundled_spec
from ucp.resharder import load_rank_state


def _helper(name: str):
    spec = importlib.util.spec_from_file_location(f"ucp_tests_resharder_{name}",
                                                  Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _helper("_ref")
SPEC = bundled_spec("llama_megatron", constants=ref.C)


def _without_layout(state):
    return {k: v for k, v in state.items() if k != "layout"}


GRID = [  # (target topology, ZeRO alignment)
    ("dp=1,tp=1,pp=1,zero=0", 1),  # shrink to one rank
    ("tp=4,zero=0", 1),  # TP 2 -> 4, PP 2 -> 1
    ("tp=2,pp=2,zero=0", 1),  # the source topology itself
    ("dp=4,zero=1", 7),  # TP 2 -> 1, PP 2 -> 1, grow DP, ZeRO-1; odd alignments pad
    ("dp=2,tp=2,zero=2", 5),
    ("dp=2,pp=2,zero=3", 1),  # ZeRO-3 per-parameter partitions
    ("dp=3,zero=3", 3),  # dp not a power of two
    ("dp=3,zero=2", 1),
    ("tp=2,dp=2,zero=3", 8),
    ("tp=4,zero=1", 1),  # dp=1: the partition is the whole group
]


@pytest.mark.parametrize("target,alignment", GRID)
def test_every_rank_equals_the_reference_cut(llama, target, alignment):
    topo = ucp.Topology.parse(target)
    for rank in range(topo.world_size):
        got = load_rank_state(llama[1], topo, rank, alignment=alignment)
        ref.assert_same(_without_layout(got), ref.reference_rank(topo, rank, alignment), f"{target} rank {rank}")
        assert got["layout"]["topology"] == str(topo) and got["layout"]["rank"] == rank


@pytest.mark.parametrize("target", ["tp=4,zero=0", "dp=2,pp=2,zero=1"])
def test_distributed_source_converted_on_the_fly(llama, target):
    topo = ucp.Topology.parse(target)
    for rank in range(topo.world_size):
        got = load_rank_state(llama[0], topo, rank, spec=SPEC)
        ref.assert_same(_without_layout(got), ref.reference_rank(topo, rank, 1), f"{target} rank {rank}")


def test_flat_layout_table_locates_every_parameter(llama):
    """The ``layout`` entry says where each parameter's flat elements sit in the partition."""
    topo, full = ucp.Topology.parse("dp=3,zero=1"), ref.full_state()
    seen: dict[str, int] = {}
    for rank in range(3):
        state = load_rank_state(llama[1], topo, rank, alignment=2)
        group = state["layout"]["groups"][0]
        assert group["padded_numel"] % 6 == 0 and group["partition"][0] == rank * group["padded_numel"] // 3
        for local, start, stop, offset in group["segments"]:
            want = ref.tp_cut(local, full[local]["exp_avg"], 1, 0).reshape(-1)[start:stop]
            assert torch.equal(state["optim"]["flat"][0]["exp_avg"][offset:offset + stop - start], want)
            seen[local] = seen.get(local, 0) + stop - start
    assert seen == {n: ref.tp_cut(n, full[n]["exp_avg"], 1, 0).numel()  # vocab padding included
                    for n in ref.names() if ref.group(n) == 0}


def test_masters_follow_the_model_dtype(llama):
    """bf16 weights keep their fp32 masters; masters=False drops them."""
    state = load_rank_state(llama[1], "dp=1", 0, masters=False)
    assert "fp32" not in state["optim"]["state"]["output_layer.weight"]
    assert state["model"]["output_layer.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("target,needle", [
    ("tp=3", "linear_qkv.weight"),  # 4 kv groups do not split over 3
    ("tp=8", "linear_qkv.weight"),
    ("pp=8", "do not spread evenly over 8 pp"),  # more stages than layers
    ("pp=3", "do not spread evenly over 3 pp"),
])
def test_a_topology_the_model_cannot_take_fails_before_any_read(llama, target, needle, monkeypatch):
    from ucp.universal import _source

    def no_reads(*a, **k):
        raise AssertionError("read before the topology was checked")
    for method in ("read", "iter_region", "_open"):  # tensors, chunks, array metadata
        monkeypatch.setattr(_source.UniversalSource, method, no_reads)
    with pytest.raises(ucp.TopologyError, match="cannot hold parameter") as e:
        load_rank_state(llama[1], target, 0)
    assert needle in str(e.value)


def test_tp_without_a_spec_is_refused(tmp_path):
    ucp.save({"model": {"w": torch.ones(4, 4)}}, str(tmp_path / "n"), step=1).wait()
    u = ucp.convert(str(tmp_path / "n"), str(tmp_path / "u"))
    with pytest.raises(ucp.TopologyError, match="tp=2.*spec"):
        load_rank_state(u, "tp=2", 0)
