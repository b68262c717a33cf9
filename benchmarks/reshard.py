"""Loading the same state onto a new topology: ucp vs torch.distributed.checkpoint (DCP).

An FSDP2 model (AdamW, one step taken) is saved on 2 ranks, by DCP and by ucp (then converted to
a universal checkpoint once; that time is reported apart). Then 4 ranks build the model under
FSDP2 and load the state, resharding 2 -> 4:

- ``dcp``: ``get_state_dict`` -> ``dcp.load`` (its own resharding) -> ``set_state_dict``;
- ``ucp``: ``ucp.resharder.load_into`` from the universal checkpoint;
- ``ucp-native``: ``load_into`` straight from ucp's per-rank save (converted on the fly).

Each is timed ``--reps`` times in the same process group after one untimed round, the methods
taking turns (so a change in machine load hits all of them), between barriers, so a time is the
slowest rank's; medians are reported. Read amplification is bytes read / bytes needed, summed over
ranks: DCP reads every saved chunk a rank's shard overlaps whole; ucp reads zarr chunks.

    python benchmarks/reshard.py --hidden 1024 --layers 4 --reps 5 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch


class Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(hidden, hidden)
        self.proj = torch.nn.Linear(hidden, hidden)
        self.fc1 = torch.nn.Linear(hidden, 4 * hidden)
        self.fc2 = torch.nn.Linear(4 * hidden, hidden)
        self.norm = torch.nn.LayerNorm(hidden)

    def forward(self, x):
        x = x + self.proj(torch.relu(self.attn(self.norm(x))))
        return x + self.fc2(torch.relu(self.fc1(x)))


def build(hidden: int, layers: int, world: int):
    """The model under FSDP2 over ``world`` ranks, and its AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block(hidden) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (world,))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def save(rank: int, world: int, root: str, hidden: int, layers: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import ucp

    model, opt = build(hidden, layers, world)
    model(torch.randn(4, hidden)).square().mean().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    t = time.perf_counter()
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/dcp")
    t_dcp = time.perf_counter() - t
    t = time.perf_counter()
    ucp.save({"model": msd, "optim": osd}, f"{root}/native", step=1).wait()
    return {"dcp_save_s": t_dcp, "ucp_save_s": time.perf_counter() - t}


def _counting_reader(path: str):
    """DCP's FileSystemReader, counting the bytes of the saved items it reads vs needs."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType

    class Reader(FileSystemReader):
        bytes_read = bytes_needed = 0

        def read_data(self, plan, planner):
            for req in plan.items:
                length = self.storage_data[req.storage_index].length
                self.bytes_read += length
                if req.type == LoadItemType.BYTE_IO:
                    self.bytes_needed += length
                else:
                    md = planner.metadata.state_dict_metadata[req.dest_index.fqn]
                    self.bytes_needed += math.prod(req.lengths) * md.properties.dtype.itemsize
            return super().read_data(plan, planner)

    return Reader(path)


def load(rank: int, world: int, root: str, hidden: int, layers: int, reps: int) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from ucp.resharder import load_into

    torch.set_num_threads(1)
    model, opt = build(hidden, layers, world)
    methods = ("dcp", "ucp", "ucp-native")
    out: dict = {m: {"times": []} for m in methods}
    for rep in range(reps + 1):  # round 0 warms up (imports, optimizer state); methods interleave
        for method in methods:
            dist.barrier()
            t = time.perf_counter()
            if method == "dcp":
                msd, osd = get_state_dict(model, opt)
                reader = _counting_reader(f"{root}/dcp")
                dcp.load({"model": msd, "optim": osd}, storage_reader=reader)
                set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
                read, needed = reader.bytes_read, reader.bytes_needed
            else:
                src = f"{root}/universal" if method == "ucp" else f"{root}/native"
                stats = load_into(model, opt, src)
                read, needed = stats.bytes_read, stats.bytes_needed
            dist.barrier()
            if rep:
                out[method]["times"].append(time.perf_counter() - t)
            out[method].update(bytes_read=read, bytes_needed=needed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ucp
    from ucp.testing import run_ranks

    root = args.dir or tempfile.mkdtemp(prefix="ucp-bench-reshard-")
    try:
        saved = run_ranks(save, 2, args=(root, args.hidden, args.layers), timeout=1800)[0].value
        t = time.perf_counter()
        ckpt = ucp.convert(f"{root}/native", f"{root}/universal", progress=False)
        convert_s = time.perf_counter() - t
        nbytes = sum(ckpt.metadata["params"][n]["nbytes"] for n in ckpt.names())
        ranks = run_ranks(load, 4, args=(root, args.hidden, args.layers, args.reps), timeout=3600)
        report = _report(ranks, saved, convert_s, nbytes, args)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report, indent=1) if args.json else _table(report))


def _report(ranks, saved, convert_s, nbytes, args) -> dict:
    out = {"model": f"{args.layers} blocks, hidden {args.hidden}", "state_bytes": nbytes,
           "reshard": "FSDP2 2 -> 4 ranks (gloo, CPU)", "reps": args.reps,
           "convert_s": convert_s, **saved, "methods": {}}
    for method in ranks[0].value:
        times = [max(r.value[method]["times"][i] for r in ranks) for i in range(args.reps)]
        read = sum(r.value[method]["bytes_read"] for r in ranks)
        needed = sum(r.value[method]["bytes_needed"] for r in ranks)
        out["methods"][method] = {"median_s": statistics.median(times), "min_s": min(times),
                                  "max_s": max(times), "bytes_read": read, "bytes_needed": needed,
                                  "amplification": read / needed if needed else None}
    return out


def _table(r: dict) -> str:
    lines = [f"{r['model']}: {r['state_bytes'] / 2**20:.0f} MiB of state; {r['reshard']}; "
             f"median of {r['reps']}",
             f"(one-time: DCP save {r['dcp_save_s']:.2f}s, ucp save {r['ucp_save_s']:.2f}s, "
             f"ucp convert {r['convert_s']:.2f}s)",
             f"{'method':12s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'read MiB':>9s} "
             f"{'needed MiB':>10s} {'ampl.':>6s}"]
    for name, m in r["methods"].items():
        lines.append(f"{name:12s} {m['median_s']:9.3f} {m['min_s']:7.3f} {m['max_s']:7.3f} "
                     f"{m['bytes_read'] / 2**20:9.1f} {m['bytes_needed'] / 2**20:10.1f} "
                     f"{m['amplification']:6.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
