"""Scale by simulation: ucp's metadata, commit and resume planning for thousands of ranks.

    .venv/bin/python benchmarks/scale.py --ranks 4096 --model llama-70b [--json]

No tensor bytes are made: every rank's state is built from meta tensors with the exact shapes of
the model, cut over the source layout as DTensors would be (model weights replicated over dp and
cut over tp; ZeRO-1 optimizer states ``fp32``/``exp_avg``/``exp_avg_sq`` cut over dp too), and
then ucp's real code runs on that metadata:

1. every rank's ``rank-RRRRR.json`` is written by ``ucp.native._save.write_rank_index`` (fragment table with
   per-block checksums, saved tree, meshes), its data file a sparse file of the recorded size;
2. the commit of rank 0, in a fresh process: the gathered statuses unpacked as the coordinator
   does (``ucp.core._coord.unpack_json``) and ``ucp.native._save.commit_statuses`` (manifest encoded and
   written): ``commit_s``, ``commit_peak_rss_bytes`` (that process's peak resident memory);
3. the resume planning of one target rank onto another layout, in a fresh process: the native
   source opened as ``Checkpointer.resume`` opens it (``NativeCheckpoint(..., lazy=True)``),
   then ``ucp.resharder.plan_rank``:
   ``plan_s``, ``plan_read_bytes`` (metadata bytes that rank read, from ucp's read counters).

Side by side: ``dcp_metadata_bytes``, the pickled ``.metadata`` that torch.distributed.checkpoint
would write for the same state and layout, built with its own classes
(``torch.distributed.checkpoint.metadata``) and deduplicated as its planner does (a replicated
chunk once). ``metadata_bytes`` is every committed ucp metadata file (rank indexes + manifest).

Default layouts: llama tp=8, pp=16, dp=ranks/128, ZeRO-1, resumed onto tp=8, pp=8, dp=ranks/64;
mixtral tp=4, ep=8, pp=8, dp=ranks/256, resumed onto tp=4, ep=8, pp=4. The last line with
``--json`` is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

MODELS: dict[str, dict[str, int]] = {
    "llama-8b": dict(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, experts=0),
    "llama-70b": dict(vocab=128256, hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, experts=0),
    "mixtral-8x22b": dict(vocab=32768, hidden=6144, layers=56, heads=48, kv_heads=8, ffn=16384, experts=8),
}
#: How each parameter is cut over tp (torchtitan's tensor-parallel plan); the same text is the UCL
#: spec the resuming job plans with.
SPEC = """index {layer} over pp = num_layers
index {expert} over ep = num_experts
param "tok_embeddings.weight"  split tp dim 0  stage first
param "output.weight"  split tp dim 0  stage last
param "norm.weight"  replicate tp  stage last
param "layers.{layer}.attention_norm.weight"  replicate tp
param "layers.{layer}.ffn_norm.weight"  replicate tp
param "layers.{layer}.attention.wq.weight"  split tp dim 0
param "layers.{layer}.attention.wk.weight"  split tp dim 0
param "layers.{layer}.attention.wv.weight"  split tp dim 0
param "layers.{layer}.attention.wo.weight"  split tp dim 1
optional param "layers.{layer}.feed_forward.w1.weight"  split tp dim 0
optional param "layers.{layer}.feed_forward.w3.weight"  split tp dim 0
optional param "layers.{layer}.feed_forward.w2.weight"  split tp dim 1
optional param "layers.{layer}.moe.router.weight"  replicate tp
optional param "layers.{layer}.moe.experts.{expert}.w1.weight"  split tp dim 0
optional param "layers.{layer}.moe.experts.{expert}.w3.weight"  split tp dim 0
optional param "layers.{layer}.moe.experts.{expert}.w2.weight"  split tp dim 1
"""
OPTIM_STATES = ("fp32", "exp_avg", "exp_avg_sq")
STEP = 1000


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: its name, global shape, the tensor dim tp cuts (None: replicated), and the
    expert it is (None: dense, held by every ep rank)."""

    name: str
    shape: tuple[int, ...]
    tp_dim: int | None
    expert: int | None = None
    decay: bool = True


def spec_text(model: dict[str, int]) -> str:
    """The UCL spec of ``model``'s layout."""
    head = f"ucl 1\nnum_layers = {model['layers']}\nnum_experts = {max(model['experts'], 1)}\n"
    return head + SPEC


def params(model: dict[str, int]) -> Iterator[tuple[int | None, Param]]:
    """``(layer, Param)`` of every parameter (layer None: embedding, final norm, output)."""
    h, v, ffn, e = model["hidden"], model["vocab"], model["ffn"], model["experts"]
    hd = h // model["heads"]
    yield None, Param("tok_embeddings.weight", (v, h), 0)
    for i in range(model["layers"]):
        p = f"layers.{i}"
        yield i, Param(f"{p}.attention_norm.weight", (h,), None, decay=False)
        yield i, Param(f"{p}.attention.wq.weight", (model["heads"] * hd, h), 0)
        yield i, Param(f"{p}.attention.wk.weight", (model["kv_heads"] * hd, h), 0)
        yield i, Param(f"{p}.attention.wv.weight", (model["kv_heads"] * hd, h), 0)
        yield i, Param(f"{p}.attention.wo.weight", (h, model["heads"] * hd), 1)
        yield i, Param(f"{p}.ffn_norm.weight", (h,), None, decay=False)
        if not e:
            for w, shape, dim in (("w1", (ffn, h), 0), ("w3", (ffn, h), 0), ("w2", (h, ffn), 1)):
                yield i, Param(f"{p}.feed_forward.{w}.weight", shape, dim)
            continue
        yield i, Param(f"{p}.moe.router.weight", (e, h), None)
        for x in range(e):
            for w, shape, dim in (("w1", (ffn, h), 0), ("w3", (ffn, h), 0), ("w2", (h, ffn), 1)):
                yield i, Param(f"{p}.moe.experts.{x}.{w}.weight", shape, dim, expert=x)
    yield None, Param("norm.weight", (h,), None, decay=False)
    yield None, Param("output.weight", (v, h), 0)


def _box(p: Param, coords: dict[str, int], topo: Any, *, sharded: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, shape) of a rank's piece, by DTensor's own rule over the parameter's mesh:
    optimizer states are cut over the data-parallel dims (dp, and ep for dense parameters) along
    dim 0, then everything over tp."""
    from ucp.native._catalog import dtensor_region

    if p.expert is not None:
        mesh = _expert_mesh(topo, coords["pp"], coords["ep"])
    else:
        mesh = _stage_mesh(topo, coords["pp"])
    at = [coords[name] for name in mesh.dim_names]
    return dtensor_region(p.shape, _placements(p, sharded), mesh.shape, at)


def rank_params(model: dict[str, int], topo: Any, rank: int) -> list[Param]:
    """The parameters a source rank holds (its pipeline stage's layers; its ep rank's experts)."""
    c = topo.coords(rank)
    per_stage, per_ep = model["layers"] // topo.pp, max(model["experts"], 1) // topo.ep
    out = []
    for layer, p in params(model):
        stage = (0 if p.name.startswith("tok_") else topo.pp - 1) if layer is None else layer // per_stage
        if stage == c["pp"] and (p.expert is None or p.expert // per_ep == c["ep"]):
            out.append(p)
    return out


def _meshes(topo: Any, rank: int, moe: bool) -> list[Any]:
    """The meshes of the rank's DTensors, as ``ucp.resharder._dtensor.mesh_info`` records them:
    its stage's (dp, ep, tp) mesh, and for a mixture of experts its expert group's (dp, tp)."""
    c = topo.coords(rank)
    return [_stage_mesh(topo, c["pp"])] + ([_expert_mesh(topo, c["pp"], c["ep"])] if moe else [])


@functools.lru_cache(maxsize=None)
def _stage_mesh(topo: Any, pp: int) -> Any:
    from ucp.native._meta import MeshInfo

    ranks = [topo.rank(pp=pp, dp=d, ep=e, tp=t) for d in range(topo.dp) for e in range(topo.ep)
             for t in range(topo.tp)]
    return MeshInfo(shape=(topo.dp, topo.ep, topo.tp), ranks=tuple(ranks), dim_names=("dp", "ep", "tp"))


@functools.lru_cache(maxsize=None)
def _expert_mesh(topo: Any, pp: int, ep: int) -> Any:
    from ucp.native._meta import MeshInfo

    ranks = [topo.rank(pp=pp, dp=d, ep=ep, tp=t) for d in range(topo.dp) for t in range(topo.tp)]
    return MeshInfo(shape=(topo.dp, topo.tp), ranks=tuple(ranks), dim_names=("dp", "tp"))


def rank_state(model: dict[str, int], topo: Any, rank: int) -> tuple[dict[str, Any], dict[str, tuple[Param, str]]]:
    """The rank's state dict of meta tensors (local shapes), and per tensor key path its
    (parameter, state)."""
    c = topo.coords(rank)
    msd, osd, where = {}, {}, {}
    groups: list[dict[str, Any]] = [{"params": [], "lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                     "weight_decay": wd, "amsgrad": False} for wd in (0.1, 0.0)]
    for p in rank_params(model, topo, rank):
        _, shape = _box(p, c, topo, sharded=False)
        msd[p.name] = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        where[f"model/{p.name}"] = (p, "param")
        _, oshape = _box(p, c, topo, sharded=True)
        osd[p.name] = {"step": torch.empty((), dtype=torch.float32, device="meta")}
        for s in OPTIM_STATES:
            osd[p.name][s] = torch.empty(oshape, dtype=torch.float32, device="meta")
            where[f"optim/state/{p.name}/{s}"] = (p, s)
        groups[0 if p.decay else 1]["params"].append(p.name)
    return {"model": msd, "optim": {"state": osd, "param_groups": groups}, "step": STEP}, where


def _placements(p: Param, sharded: bool) -> tuple[str, ...]:
    """DTensor placements over the parameter's mesh, as ``ucp.resharder._dtensor`` writes them."""
    tp = "R" if p.tp_dim is None else f"S({p.tp_dim})"
    dp = "S(0)" if sharded else "R"
    return (dp, tp) if p.expert is not None else (dp, dp, tp)


def rank_fragments(model: dict[str, int], topo: Any, rank: int, rng: np.random.Generator
                   ) -> tuple[Any, list[Any], int]:
    """The saved tree, the fragment table as ``ucp.save`` records it (checksums made up: no
    bytes exist) and the size of the rank's data file."""
    from ucp.native._meta import TensorFragment, block_size
    from ucp.core._stfile import dtype_name
    from ucp.core._tree import flatten

    state, where = rank_state(model, topo, rank)
    tree, tensors = flatten(state)
    c, frags, data = topo.coords(rank), [], 0
    for key, (_path, t) in tensors.items():
        nbytes = t.numel() * t.element_size()
        data += nbytes
        blocks, size = None, block_size(nbytes)
        if nbytes > size:
            blocks = tuple(rng.integers(0, 2**32, -(-nbytes // size), dtype=np.uint64).tolist())
        crc = int(rng.integers(0, 2**32))
        if key not in where:  # the per-parameter step counter: a plain tensor on every rank
            frags.append(TensorFragment(key=key, dtype="float32", shape=(), global_shape=(),
                                        offsets=(), crc32c=0x12345678))
            continue
        p, s = where[key]
        offsets, shape = _box(p, c, topo, sharded=s != "param")
        frags.append(TensorFragment(key=key, dtype=dtype_name(t.dtype), shape=shape, global_shape=p.shape,
                                    offsets=offsets, placements=_placements(p, s != "param"),
                                    mesh=0 if p.expert is None else 1,
                                    crc32c=crc, block_crc32c=blocks, block_bytes=size))
    return tree, frags, data + 8 + 64 * len(frags)  # + a safetensors header's worth


# -- phase 1: every rank writes its index ----------------------------------------------------------
def write_ranks(root: str, model: dict[str, int], topo: Any) -> dict[str, Any]:
    """Every rank's index through ucp's own writer; returns the statuses rank 0 gathers."""
    from ucp.native._catalog import Representative, layout_digest, tree_digest
    from ucp.native._meta import FileRecord, rank_stem, step_dir
    from ucp.native._save import write_rank_index
    from ucp.storage import Storage

    storage, rng = Storage(root), np.random.default_rng(0)
    os.makedirs(os.path.join(root, step_dir(STEP)), exist_ok=True)
    statuses, index_bytes, t0 = [], 0, time.perf_counter()
    first: dict[str, tuple[int, str]] = {}  # layout digest -> (lowest rank, its tree digest)
    for rank in range(topo.world_size):
        tree, frags, size = rank_fragments(model, topo, rank, rng)
        meshes = _meshes(topo, rank, moe=model["experts"] > 0)
        # what the save's first exchange tells each rank: the lowest rank of its layout
        layout, tree_crc = layout_digest(tree, frags, meshes), tree_digest(tree)
        rep, rep_tree = first.setdefault(layout, (rank, tree_crc))
        like = Representative(rep, layout, rep_tree == tree_crc)
        stem = rank_stem(rank)
        with open(os.path.join(root, step_dir(STEP), f"{stem}.safetensors"), "wb") as f:
            f.truncate(size)  # sparse: the size is recorded and checked, no byte is stored
        data = FileRecord(size=size, crc32c=int(rng.integers(0, 2**32)))
        rec = write_rank_index(storage, step=STEP, rank=rank, world_size=topo.world_size, tree=tree,
                               fragments=frags, data=data, meshes=meshes, job="bench", like=like)
        index_bytes += rec.size
        statuses.append({"rank": rank, "error": None,
                         "meshes": [m.to_dict() for m in meshes] if rep == rank else [],
                         "layout": layout,
                         "files": {f"{stem}.safetensors": data.to_dict(), f"{stem}.json": rec.to_dict()}})
        if rank % 256 == 255:
            print(f"  wrote {rank + 1}/{topo.world_size} rank indexes", file=sys.stderr)
    with open(os.path.join(root, "statuses.json"), "w") as f:
        json.dump(statuses, f)
    return {"rank_index_bytes": index_bytes, "write_s": time.perf_counter() - t0}


# -- phase 2: rank 0 commits ----------------------------------------------------------------------
def commit_phase(root: str, topo: Any, spec: str) -> dict[str, Any]:
    """Rank 0's commit, from the statuses as the gather delivers them (padded uint8 buffers)."""
    from ucp.core._coord import pack_json, unpack_json
    from ucp.native._save import commit_statuses
    from ucp.storage import Storage

    with open(os.path.join(root, "statuses.json")) as f:
        sent = [pack_json(s) for s in json.load(f)]  # what each rank puts on the wire
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    longest = max(int(s.numel()) for s in sent)
    bufs = []
    for s in sent:  # the gather's receive buffers, each padded to the longest message
        b = torch.zeros(longest, dtype=torch.uint8)
        b[:s.numel()] = s
        bufs.append(b)
    statuses = unpack_json(bufs, [int(s.numel()) for s in sent])
    del bufs
    commit_statuses(Storage(root), statuses, step=STEP, world_size=topo.world_size, topology=topo,
                    spec=spec, job="bench")
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"commit_s": took, "commit_peak_rss_bytes": peak, "commit_rss_before_bytes": base}


# -- phase 3: one target rank plans its resume ----------------------------------------------------
def plan_phase(root: str, model: dict[str, int], target: Any, rank: int) -> dict[str, Any]:
    """Opens the native source as ``Checkpointer.resume`` does (lazily) and plans one target rank."""
    from ucp.native._source import NativeCheckpoint
    from ucp.grammar import load_spec
    from ucp.resharder import plan_rank
    from ucp.resharder._source import ConvertingSource
    from ucp.storage import Storage, read_counter
    from ucp.native._layout import newest_step, read_manifest

    spec = load_spec(spec_text(model))
    before, t0 = read_counter(), time.perf_counter()
    storage = Storage(root)
    manifest = read_manifest(storage, newest_step(storage))
    source = ConvertingSource(NativeCheckpoint(storage, manifest, lazy=True), root)
    plan = plan_rank(source, target, rank, spec=spec)
    took = time.perf_counter() - t0
    return {"plan_s": took, "plan_read_bytes": (read_counter() - before).bytes,
            "plan_reads": len(plan.reads), "plan_tensors": len(plan.tensors)}


# -- side by side: DCP's metadata -----------------------------------------------------------------
def dcp_metadata_bytes(model: dict[str, int], topo: Any) -> int:
    """The size of the pickled ``.metadata`` DCP writes for this state and layout."""
    import pickle

    from torch.distributed.checkpoint import metadata as m
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    chunks: dict[str, dict[tuple[int, ...], tuple[tuple[int, ...], int]]] = {}
    props: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    rank_of: dict[tuple[str, tuple[int, ...]], int] = {}
    for rank in range(topo.world_size):
        c = topo.coords(rank)
        for p in rank_params(model, topo, rank):
            for s, dtype in (("param", torch.bfloat16), *((s, torch.float32) for s in OPTIM_STATES)):
                fqn = f"model.{p.name}" if s == "param" else f"optim.state.{p.name}.{s}"
                off, shape = _box(p, c, topo, sharded=s != "param")
                props[fqn] = (dtype, p.shape)
                # the planner's dedup: a replicated chunk is written by one rank
                if chunks.setdefault(fqn, {}).setdefault(off, (shape, rank))[1] == rank:
                    rank_of[(fqn, off)] = rank
            chunks.setdefault(f"optim.state.{p.name}.step", {}).setdefault((), ((), 0))
            props[f"optim.state.{p.name}.step"] = (torch.float32, ())
    sd_md: dict[str, Any] = {}
    storage_data: dict[Any, Any] = {}
    planner_data: dict[str, Any] = {}
    for fqn, boxes in chunks.items():
        dtype, shape = props[fqn]
        sd_md[fqn] = m.TensorStorageMetadata(
            properties=m.TensorProperties(dtype=dtype), size=torch.Size(shape),
            chunks=[m.ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, (s, _) in boxes.items()])
        planner_data[fqn] = tuple(fqn.split("."))
        for i, (o, (s, r)) in enumerate(boxes.items()):
            n = int(np.prod(s, dtype=np.int64)) * dtype.itemsize
            storage_data[m.MetadataIndex(fqn, torch.Size(o), i)] = _StorageInfo(f"__{r}_0.distcp", 0, n)
    sd_md["optim.param_groups"] = m.BytesStorageMetadata()
    sd_md["step"] = m.BytesStorageMetadata()
    md = m.Metadata(state_dict_metadata=sd_md, planner_data=planner_data, storage_data=storage_data)
    return len(pickle.dumps(md))


def default_layouts(model_name: str, ranks: int) -> tuple[str, str]:
    if MODELS[model_name]["experts"]:
        return f"tp=4,ep=8,pp=8,dp={max(1, ranks // 256)},zero=1", f"tp=4,ep=8,pp=4,dp={max(1, ranks // 128)},zero=1"
    return f"tp=8,pp=16,dp={max(1, ranks // 128)},zero=1", f"tp=8,pp=8,dp={max(1, ranks // 64)},zero=1"


def _phase(argv: list[str]) -> dict[str, Any]:
    """Runs one phase in a fresh interpreter (its peak memory is its own); its JSON result."""
    out = subprocess.run([sys.executable, __file__, *argv], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=4096)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama-70b")
    ap.add_argument("--source", help="source topology (default: see the module docstring)")
    ap.add_argument("--target", help="topology the resuming job plans for")
    ap.add_argument("--target-rank", type=int, help="the resuming rank planned (default: middle)")
    ap.add_argument("--dir", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--phase", choices=["commit", "plan"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    from ucp import Topology

    model = MODELS[args.model]
    src_text, dst_text = default_layouts(args.model, args.ranks)
    source, target = Topology.parse(args.source or src_text), Topology.parse(args.target or dst_text)
    trank = target.world_size // 2 + 1 if args.target_rank is None else args.target_rank
    if args.phase == "commit":
        print(json.dumps(commit_phase(args.dir, source, spec_text(model))))
        return
    if args.phase == "plan":
        print(json.dumps(plan_phase(args.dir, model, target, trank)))
        return
    if source.world_size != args.ranks:
        ap.error(f"source topology {source} has {source.world_size} ranks, not --ranks {args.ranks}")
    root = args.dir or tempfile.mkdtemp(prefix="ucp-scale-")
    try:
        result: dict[str, Any] = {"model": args.model, "ranks": args.ranks, "source": str(source),
                                  "target": str(target), "target_rank": trank}
        print(f"writing {args.ranks} rank indexes under {root} ...", file=sys.stderr)
        result.update(write_ranks(root, model, source))
        common = ["--ranks", str(args.ranks), "--model", args.model, "--source", str(source),
                  "--target", str(target), "--target-rank", str(trank), "--dir", root]
        result.update(_phase([*common, "--phase", "commit"]))
        result.update(_phase([*common, "--phase", "plan"]))
        from ucp.native._meta import step_dir

        sd = os.path.join(root, step_dir(STEP))
        result["metadata_bytes"] = sum(os.path.getsize(os.path.join(sd, n)) for n in os.listdir(sd)
                                       if n.endswith(".json"))
        result["dcp_metadata_bytes"] = dcp_metadata_bytes(model, source)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:>24}: {v:.3f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
