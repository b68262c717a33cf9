"""Read amplification (bytes read / bytes needed) with the default chunking: at most 1.1 for TP
and ZeRO targets on realistic shapes; the executor reads exactly what the estimate says; reads
in flight stay bounded."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.universal._checkpoint import chunk_shape
from ucp.engines._base import ParamInfo
from ucp.grammar import load_spec
from ucp.resharder import ArrayInfo, estimate_reads, plan_rank, plan_ranks, read_plan
from ucp.universal import UniversalSource

# A Llama-style model in Hugging Face naming (separate q/k/v and gate/up projections), hidden 1024.
H, V, F, LAYERS, KV = 1024, 32000, 2816, 4, 256
SPEC = load_spec(f"""ucl 1
index {{layer}} over pp = {LAYERS}
param "embed.weight" split tp dim 0 stage first
param "layers.{{layer}}.o_proj.weight" split tp dim 1
param "layers.{{layer}}.down_proj.weight" split tp dim 1
param "layers.{{layer}}.{{p:*}}_proj.weight" split tp dim 0
param "layers.{{layer}}.{{n:*}}_norm.weight" replicate tp
param "norm.weight" replicate tp stage last
param "lm_head.weight" split tp dim 0 stage last
""")


def _shapes() -> dict[str, tuple[int, ...]]:
    out = {"embed.weight": (V, H)}
    for i in range(LAYERS):
        p = f"layers.{i}"
        out.update({f"{p}.q_proj.weight": (H, H), f"{p}.k_proj.weight": (KV, H),
                    f"{p}.v_proj.weight": (KV, H), f"{p}.o_proj.weight": (H, H),
                    f"{p}.gate_proj.weight": (F, H), f"{p}.up_proj.weight": (F, H),
                    f"{p}.down_proj.weight": (H, F), f"{p}.attn_norm.weight": (H,),
                    f"{p}.mlp_norm.weight": (H,)})
    return {**out, "norm.weight": (H,), "lm_head.weight": (V, H)}


class Catalog:
    """Metadata only: planning and the estimate need no data."""

    def __init__(self, shapes, dtype=torch.float32):
        self.shapes, self.dtype = shapes, dtype
        self.param_groups = [{"lr": 1e-3}, {"lr": 1e-3, "weight_decay": 0.0}]

    def names(self):
        return list(self.shapes)

    def info(self, name):
        states = ("param", "fp32") if self.dtype != torch.float32 else ("fp32",)
        return ParamInfo(self.shapes[name], self.dtype, states + ("step", "exp_avg", "exp_avg_sq"),
                         group=1 if len(self.shapes[name]) == 1 else 0)

    def buffer_names(self):
        return []

    def array(self, name, state):
        shape = () if state == "step" else self.shapes[name]
        itemsize = self.dtype.itemsize if state == "param" else 4
        return ArrayInfo(shape, None, chunk_shape(shape, itemsize), itemsize)


TARGETS = ["tp=2", "tp=4", "tp=8", "dp=2,zero=1", "dp=4,zero=1", "dp=4,zero=2", "dp=2,zero=3",
           "dp=4,zero=3", "dp=8,zero=3", "tp=2,dp=2,zero=1", "tp=2,dp=2,zero=3", "tp=2,pp=2",
           "pp=2,dp=2,zero=3", "dp=3,zero=1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", TARGETS)
def test_realistic_model_reads_at_most_ten_percent_more(target, dtype):
    catalog, topo = Catalog(_shapes(), dtype), ucp.Topology.parse(target)
    spec = SPEC if topo.tp * topo.pp > 1 else None
    for plan in plan_ranks(catalog, topo, spec=spec):
        stats = estimate_reads(plan, catalog.array)
        assert stats.bytes_needed > 0
        assert stats.amplification <= 1.1, (target, plan.rank, stats)


@pytest.mark.parametrize("shape", [(1024, 1024), (2048, 2048), (4096, 1024), (1024, 4096), (4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_large_matrix_cut_any_way(shape, dtype):
    """Column- and row-parallel TP and ZeRO-3 partitions of one matrix, each rank on its own."""
    catalog = Catalog({"w": shape}, dtype)
    cuts = [(f"tp={n}", f'param "w" split tp dim {d}') for n in (2, 4) for d in (0, 1)]
    cuts += [(f"dp={n},zero=3", None) for n in (2, 4, 8)]
    for target, rule in cuts:
        topo = ucp.Topology.parse(target)
        for plan in plan_ranks(catalog, topo, spec=rule and load_spec(rule)):
            stats = estimate_reads(plan, catalog.array)
            assert stats.amplification <= 1.1, (shape, dtype, target, plan.rank, stats)


def test_measured_reads_equal_the_estimate(llama):
    source = UniversalSource(ucp.open(llama[1]))
    for target in ["tp=4", "dp=3,zero=1", "dp=2,pp=2,zero=3"]:
        topo = ucp.Topology.parse(target)
        for rank in range(topo.world_size):
            plan = plan_rank(source, topo, rank, spec=load_spec(source.spec_text,
                                                                constants=source.spec_constants))
            got = read_plan(plan, source).stats
            want = estimate_reads(plan, source.array)
            assert (got.bytes_read, got.bytes_needed, got.chunks_read) == \
                (want.bytes_read, want.bytes_needed, want.chunks_read), (target, rank)


def test_reads_in_flight_stay_bounded(tmp_path, monkeypatch):
    """A rank loading a 4 MiB tensor whole reads blocks of at most the limit, one chunk at a time."""
    w = torch.randn(1024, 1024)
    ucp.save({"model": {"w": w}}, str(tmp_path / "n"), step=1).wait()
    source = UniversalSource(ucp.convert(str(tmp_path / "n"), str(tmp_path / "u")))
    sizes = []
    real = UniversalSource.iter_region

    def spy(self, name, state, region):
        sizes.append(torch.Size([b - a for a, b in region]).numel() * 4)  # one block
        for sub, data in real(self, name, state, region):
            assert data.numel() * 4 <= 64 * 1024  # then chunk by chunk
            yield sub, data
    monkeypatch.setattr(UniversalSource, "iter_region", spy)
    loaded = read_plan(plan_rank(source, ucp.Topology(), 0), source, max_block_bytes=256 * 1024)
    assert torch.equal(loaded.tensors[("model", "w")], w)
    assert max(sizes) <= 256 * 1024 and sum(sizes) == w.numel() * 4
    assert loaded.stats.amplification == pytest.approx(1.0, abs=1e-3)
