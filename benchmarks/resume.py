"""Elastic resume: ``ucp.Checkpointer.resume`` vs ``torch.distributed.checkpoint.load`` (DCP).

An FSDP2 model (AdamW, one step taken) is saved on 2 ranks, once by ``ucp.Checkpointer`` (ucp's
native per-rank files) and once by ``dcp.save``. Then 4 ranks build the model under FSDP2 and load
the state, resharding 2 -> 4:

- ``ucp``: ``Checkpointer.resume(state)``, straight from the native files (each rank reads only
  the blocks of the saved fragments that hold its shards);
- ``dcp``: ``get_state_dict`` -> ``dcp.load`` -> ``set_state_dict``.

Each (method, repeat) runs in fresh processes, the methods taking turns, so peak memory is that
of one load. Reported per method (medians over repeats): wall time of the slowest rank; bytes read
summed over ranks (``rchar`` of /proc/self/io: every read system call, whatever library made it)
against the bytes the ranks hold afterwards; and the largest growth of one rank's resident memory
while loading, beside that rank's share of the state.

    python benchmarks/resume.py --hidden 1024 --layers 4 --reps 3 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch


def build(hidden: int, layers: int, world: int, seed: int):
    """The model under FSDP2 over ``world`` ranks, and its AdamW."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(hidden, 4 * hidden), torch.nn.ReLU(),
                                                      torch.nn.Linear(4 * hidden, hidden)) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (world,))
    for block in model:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)


def save(rank: int, world: int, root: str, hidden: int, layers: int) -> bool:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import ucp

    model, opt = build(hidden, layers, world, seed=0)
    model(torch.randn(4, hidden)).square().mean().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{root}/dcp")
    ckpt = ucp.Checkpointer(f"{root}/ucp", every=1)
    ckpt.maybe_save(1, {"model": model, "optim": opt})
    ckpt.close()
    return True


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(rank: int, world: int, method: str, root: str, hidden: int, layers: int) -> dict:
    """One rank's load; returns its time, bytes read, memory growth and share of the state."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ucp

    import ucp.native._source  # noqa: F401 - both libraries' modules imported before timing
    import ucp.resharder  # noqa: F401

    torch.set_num_threads(1)
    model, opt = build(hidden, layers, world, seed=1)
    samples, stop = [_rss()], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_rss())
            time.sleep(0.002)
    dist.barrier()
    base, before = _rss(), _rchar()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    if method == "ucp":
        assert ucp.Checkpointer(f"{root}/ucp", every=1).resume({"model": model, "optim": opt}) == 1
    else:
        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=f"{root}/dcp")
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    read = _rchar() - before
    local = [p.to_local() for p in model.parameters()]
    local += [v.to_local() for st in opt.state.values() for v in st.values() if hasattr(v, "to_local")]
    dist.barrier()
    return {"s": seconds, "read": read, "grew": max(samples) - base,
            "held": sum(t.numel() * t.element_size() for t in local)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from ucp.testing import run_ranks

    root = args.dir or tempfile.mkdtemp(prefix="ucp-bench-resume-")
    runs: dict[str, list[list[dict]]] = {"ucp": [], "dcp": []}
    try:
        run_ranks(save, 2, args=(root, args.hidden, args.layers), timeout=1800)
        for _ in range(args.reps):
            for method in runs:
                ranks = run_ranks(load, 4, args=(method, root, args.hidden, args.layers), timeout=1800)
                runs[method].append([r.value for r in ranks])
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    report = _report(runs, args)
    print(json.dumps(report) if args.json else _table(report))


def _report(runs: dict, args: argparse.Namespace) -> dict:
    out = {"model": f"{args.layers} MLP blocks, hidden {args.hidden}, FSDP2 2 -> 4 ranks (gloo, CPU)",
           "reps": args.reps, "methods": {}}
    for method, reps in runs.items():
        held = sum(r["held"] for r in reps[0])
        out["methods"][method] = {
            "median_s": statistics.median(max(r["s"] for r in rep) for rep in reps),
            "times_s": [max(r["s"] for r in rep) for rep in reps],
            "bytes_read": statistics.median(sum(r["read"] for r in rep) for rep in reps),
            "bytes_held": held,
            "peak_growth_bytes": statistics.median(max(r["grew"] for r in rep) for rep in reps),
            "rank_share_bytes": max(r["held"] for r in reps[0])}
        m = out["methods"][method]
        m["read_over_held"] = m["bytes_read"] / held
    u, d = out["methods"]["ucp"], out["methods"]["dcp"]
    out["time_ratio_ucp_over_dcp"] = u["median_s"] / d["median_s"]
    return out


def _table(r: dict) -> str:
    lines = [f"{r['model']}; median of {r['reps']}",
             f"{'method':6s} {'median s':>9s} {'read MiB':>9s} {'held MiB':>9s} {'read/held':>9s} "
             f"{'peak growth MiB':>15s} {'rank share MiB':>14s}"]
    for name, m in r["methods"].items():
        lines.append(f"{name:6s} {m['median_s']:9.3f} {m['bytes_read'] / 2**20:9.1f} "
                     f"{m['bytes_held'] / 2**20:9.1f} {m['read_over_held']:9.3f} "
                     f"{m['peak_growth_bytes'] / 2**20:15.1f} {m['rank_share_bytes'] / 2**20:14.1f}")
    lines.append(f"ucp / dcp time: {r['time_ratio_ucp_over_dcp']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
