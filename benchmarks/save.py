"""Save benchmark: how long ucp.save stalls training, and how fast it writes in the background.

    .venv/bin/python benchmarks/save.py [--mb 512] [--ranks 2] [--repeats 5] [--dir /tmp/x]

About ``--mb`` MB of fp32 state is split over ``--ranks`` ranks (real gloo group). Side by side,
in one run, medians of ``--repeats``:
  * blocking time: a plain ``clone`` of the tensors (the staging floor), ``ucp.save``,
    ``torch.save`` (synchronous), and ``torch.distributed.checkpoint.async_save``;
  * background throughput: ``ucp.save`` until committed (fsync included) vs a raw sequential
    write + fsync of the same bytes by every rank at once.
Targets (issue 2): blocking <= 1.3x clone and <= DCP async_save; throughput >= 70% of raw.
Also, in turn with it, ``ucp.save`` with the per-fragment fingerprints (issue 16) turned off in
the ranks: what they cost the save (blocking, and until committed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist


import ucp
from ucp.testing import run_ranks


def _state(mb_per_rank: int, rank: int) -> dict[str, torch.Tensor]:
    n_tensors = 16
    numel = mb_per_rank * 2**20 // 4 // n_tensors
    g = torch.Generator().manual_seed(rank)
    return {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n_tensors)}


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _raw_write(path: str, state: dict[str, torch.Tensor]) -> None:
    with open(path, "wb", buffering=0) as f:
        for t in state.values():
            f.write(memoryview(t.view(torch.uint8).numpy()))
        os.fsync(f.fileno())


@contextlib.contextmanager
def _fingerprints(on: bool):
    """Per-fragment fingerprints of the save on (ucp's default) or off, in this rank."""
    from ucp.native import _save

    real = _save._fingerprint
    if not on:
        _save._fingerprint = lambda frag, tensor: None
    try:
        yield
    finally:
        _save._fingerprint = real


def bench(rank: int, world: int, mb_per_rank: int, repeats: int, root: str) -> dict[str, list[float]]:
    import torch.distributed.checkpoint as dcp

    state = _state(mb_per_rank, rank)
    out: dict[str, list[float]] = {k: [] for k in
                                   ("clone", "ucp_block", "ucp_total", "torch_save", "dcp_block", "raw",
                                    "nofp_block", "nofp_total")}
    for i in range(repeats):
        handle = None

        def ucp_save():
            nonlocal handle
            handle = ucp.save(state, url, step=i)
        # alternate which goes first, so neither always meets a freshly freed heap
        clone = lambda: out["clone"].append(_timed(lambda: [t.clone() for t in state.values()]))  # noqa: E731
        if i % 2:
            clone()
        for fp in ((True, False) if i % 2 else (False, True)):  # with and without fingerprints, in turn
            block, total = ("ucp_block", "ucp_total") if fp else ("nofp_block", "nofp_total")
            url = os.path.join(root, f"ucp-{i}-{int(fp)}")
            with _fingerprints(fp):
                out[block].append(_timed(ucp_save))
                t0 = time.perf_counter()
                handle.wait()
            out[total].append(out[block][-1] + time.perf_counter() - t0)
        if not i % 2:
            clone()
        out["torch_save"].append(_timed(lambda: torch.save(state, os.path.join(root, f"ts-{i}-{rank}.pt"))))
        fut = None

        def dcp_save():
            nonlocal fut
            fut = dcp.async_save(state, checkpoint_id=os.path.join(root, f"dcp-{i}"))
        out["dcp_block"].append(_timed(dcp_save))
        fut.result()
        out["raw"].append(_timed(lambda: _raw_write(os.path.join(root, f"raw-{i}-{rank}.bin"), state)))
        dist.barrier()
        if rank == 0:
            for name in os.listdir(root):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True) if os.path.isdir(
                    os.path.join(root, name)) else os.remove(os.path.join(root, name))
        dist.barrier()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=512, help="total state size in MB")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = p.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="ucp-bench-save-")
    os.makedirs(root, exist_ok=True)
    results = run_ranks(bench, args.ranks, args=(args.mb // args.ranks, args.repeats, root), timeout=3600)
    # per repeat, the slowest rank is what the job sees
    per = {k: [max(r.value[k][i] for r in results) for i in range(args.repeats)] for k in results[0].value}
    med = {k: statistics.median(v) for k, v in per.items()}
    total_mb = args.mb
    print(f"state: {total_mb} MB fp32 over {args.ranks} ranks; medians of {args.repeats} runs; dir {root}")
    print(f"{'what':34s} {'median s':>9s}  {'runs'}")
    labels = {"clone": "clone (staging floor)", "ucp_block": "ucp.save blocking",
              "torch_save": "torch.save (blocking, writes)", "dcp_block": "dcp.async_save blocking",
              "ucp_total": "ucp.save until committed", "raw": "raw write + fsync"}
    for k, label in labels.items():
        print(f"{label:34s} {med[k]:9.3f}  {' '.join(f'{x:.3f}' for x in per[k])}")
    ratio_block = statistics.median(u / c for u, c in zip(per["ucp_block"], per["clone"]))
    ratio_dcp = statistics.median(u / d for u, d in zip(per["ucp_block"], per["dcp_block"]))
    thr_ucp = total_mb / med["ucp_total"]
    thr_raw = total_mb / med["raw"]
    fp_block = statistics.median(u / n for u, n in zip(per["ucp_block"], per["nofp_block"]))
    fp_total = statistics.median(u / n for u, n in zip(per["ucp_total"], per["nofp_total"]))
    print(f"{'ucp.save blocking, no fingerprints':34s} {med['nofp_block']:9.3f}  "
          f"{' '.join(f'{x:.3f}' for x in per['nofp_block'])}")
    print(f"{'until committed, no fingerprints':34s} {med['nofp_total']:9.3f}  "
          f"{' '.join(f'{x:.3f}' for x in per['nofp_total'])}")
    print(f"fingerprints: blocking x{fp_block:.2f}, until committed x{fp_total:.2f} (medians of per-run ratios)")
    print(f"ucp blocking / clone          = {ratio_block:.2f}   (target <= 1.3)")
    print(f"ucp blocking / dcp async_save = {ratio_dcp:.2f}   (target <= 1.0)")
    print(f"ucp throughput {thr_ucp:.0f} MB/s vs raw {thr_raw:.0f} MB/s = {thr_ucp / thr_raw:.0%}   (target >= 70%)")
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
