"""Make a large, real DeepSpeed checkpoint for the conversion benchmark (CPU + gloo, no GPU needed).

It runs the tests' generator, ``tests/engines/_ds_train.py`` (a GPT trained for a few steps by real
DeepSpeed, then ``save_checkpoint``), under ``torch.distributed.run`` with a bigger model::

    python benchmarks/make_deepspeed_ckpt.py /data/ds-200m                    # ~217M params, ZeRO-2 bf16, 2 ranks
    python benchmarks/make_deepspeed_ckpt.py /data/ds-400m --size 400m
    python benchmarks/make_deepspeed_ckpt.py /tmp/ds-small --size small       # ~10M params, seconds
    python benchmarks/make_deepspeed_ckpt.py OUT --hidden 768 --layers 8      # any size

Needs DeepSpeed 0.19.8 in the environment. Progress goes to stderr; one JSON line on stdout gives
the model size, the checkpoint's bytes and files, and the wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

TRAIN = Path(__file__).resolve().parent.parent / "tests" / "engines" / "_ds_train.py"

#: preset -> (hidden, layers, vocab); parameters with an untied head: 2*vocab*h + layers*12*h^2 (+ small)
SIZES = {
    "small": (256, 4, 8000),
    "200m": (1024, 12, 32000),
    "400m": (1280, 18, 32000),
}


def _train_module():
    spec = importlib.util.spec_from_file_location("ucp_bench_ds_train", TRAIN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def count_params(train_flags: list[str]) -> int:
    """Parameters of the model the flags describe (built on the meta device: no memory, no time)."""
    mod = _train_module()
    args = mod.parse_args(["unused", *train_flags])
    with torch.device("meta"):
        model = mod.TinyGPT(vocab=args.vocab, hidden=args.hidden, heads=args.heads, layers=args.layers,
                            seq=args.seq, tie=args.tie)
    return sum(p.numel() for p in model.parameters())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dir_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="DeepSpeed save directory to create (must not exist)")
    p.add_argument("--size", choices=sorted(SIZES), default="200m", help="model preset (default 200m)")
    p.add_argument("--hidden", type=int, help="override the preset's hidden size")
    p.add_argument("--layers", type=int, help="override the preset's number of blocks")
    p.add_argument("--vocab", type=int, help="override the preset's vocabulary")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--ranks", type=int, default=2, help="data-parallel ranks (processes)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), default=2)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--steps", type=int, default=1, help="training steps before saving (default 1)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before the run is stopped")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out.exists():
        print(f"Error: {args.out} exists; choose a new directory", file=sys.stderr)
        return 1
    hidden, layers, vocab = SIZES[args.size]
    flags = ["--stage", str(args.stage), "--dtype", args.dtype, "--steps", str(args.steps), "--batch", "1",
             "--hidden", str(args.hidden or hidden), "--layers", str(args.layers or layers),
             "--vocab", str(args.vocab or vocab), "--heads", str(args.heads), "--seq", str(args.seq),
             "--groups", "2"]
    params = count_params(flags)
    print(f"training a {params / 1e6:.1f}M-parameter GPT on {args.ranks} ranks (ZeRO-{args.stage}, "
          f"{args.dtype}) and saving to {args.out} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(TRAIN), str(args.out), *flags]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, timeout=args.timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.ranks))})
    except subprocess.TimeoutExpired:
        print(f"Error: training did not finish in {args.timeout:.0f}s; try a smaller --size", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"Error: training failed with exit code {proc.returncode} (see the log above)", file=sys.stderr)
        return 1
    nbytes, nfiles = _dir_size(args.out)
    print(json.dumps({"out": str(args.out), "params": params, "bytes": nbytes, "files": nfiles,
                      "seconds": round(seconds, 1), "ranks": args.ranks, "stage": args.stage,
                      "dtype": args.dtype, "flags": flags}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
