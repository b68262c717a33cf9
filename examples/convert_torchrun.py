"""Convert a checkpoint with every rank of a torchrun job: how a multi-node job converts.

    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        examples/convert_torchrun.py s3://bucket/run s3://bucket/run-universal

Every rank converts its share of the parameters (``ucp.convert`` deals them out by rank), reading
the source and writing the universal checkpoint on the one object store that every node reaches;
rank 0 commits it once every share is written. See docs/scale.md.
"""

import argparse

import torch.distributed as dist

import ucp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="the checkpoint to convert (ucp, DeepSpeed or DCP; any fsspec URL)")
    ap.add_argument("dst", help="where the universal checkpoint goes")
    ap.add_argument("--workers", type=int, default=1, help="processes per rank")
    args = ap.parse_args()
    dist.init_process_group("gloo")  # ucp coordinates on its own gloo group; no GPU needed
    try:
        universal = ucp.convert(args.src, args.dst, workers=args.workers)
        print(f"rank {dist.get_rank()}: step {universal.step}, {len(universal.names())} parameters")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
