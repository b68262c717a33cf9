"""GPU save benchmark (run on a CUDA machine): how long ucp.save stalls a GPU training loop.

    python benchmarks/save_cuda.py [--mb 1024] [--repeats 5]

Single process, ``--mb`` MB of fp32 CUDA tensors. Side by side, medians of ``--repeats``:
device->host copy into fresh pageable memory (``.cpu()``), into fresh pinned memory (the floor
ucp's staging targets), ``ucp.save`` blocking time, and ``dcp.async_save`` blocking time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

import ucp


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    n = args.mb * 2**20 // 4 // 16
    state = {f"l{i}": torch.randn(n, device="cuda") for i in range(16)}
    root = tempfile.mkdtemp(prefix="ucp-cuda-bench-")
    res: dict[str, list[float]] = {k: [] for k in ("cpu()", "pinned copy", "ucp.save", "dcp.async_save")}
    import torch.distributed.checkpoint as dcp

    for i in range(args.repeats):
        res["cpu()"].append(timed(lambda: [t.cpu() for t in state.values()]))

        def pinned():
            out = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in state.values()]
            for o, t in zip(out, state.values()):
                o.copy_(t, non_blocking=True)
        res["pinned copy"].append(timed(pinned))
        h = None

        def save():
            nonlocal h
            h = ucp.save(state, os.path.join(root, f"u{i}"), step=i)
        res["ucp.save"].append(timed(save))
        h.wait()
        fut = None

        def dsave():
            nonlocal fut
            fut = dcp.async_save(state, checkpoint_id=os.path.join(root, f"d{i}"))
        try:
            res["dcp.async_save"].append(timed(dsave))
            fut.result()
        except Exception as e:  # noqa: BLE001 - report, keep the other figures
            print(f"dcp.async_save failed: {e}")
    print(f"{args.mb} MB fp32 on {torch.cuda.get_device_name()}; medians of {args.repeats}")
    for k, v in res.items():
        if v:
            print(f"{k:16s} {statistics.median(v):.4f} s   ({' '.join(f'{x:.4f}' for x in v)})")
    if res["dcp.async_save"]:
        print(f"ucp.save / pinned copy = {statistics.median(res['ucp.save']) / statistics.median(res['pinned copy']):.2f}; "
              f"ucp.save / dcp.async_save = {statistics.median(res['ucp.save']) / statistics.median(res['dcp.async_save']):.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
