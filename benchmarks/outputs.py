"""`ucp reshard` and `ucp export` against their durable I/O floor, on the 217M-parameter model.

    .venv/bin/python benchmarks/outputs.py [--dir /work/bench] [--out DIR] [--repeats 3]

Uses (and makes once, under --dir) the real DeepSpeed ZeRO-2 bf16 checkpoint of
``benchmarks/convert.py`` and its universal checkpoint (``ucp convert``), then, side by side in
one run, medians of --repeats:
  * ``ucp reshard U OUT --to dp=4,zero=2`` (native per-rank files) and ``--engine
    deepspeed-universal`` (DeepSpeed's universal layout);
  * ``ucp export U HF --dtype bf16`` (Hugging Face safetensors);
  * each one's durable floor: a process reading what the command must read (every array for
    the reshards, the bf16 weights for the export) and writing as many bytes as it wrote to one
    file, fsync'd; through the page cache and around it (O_DIRECT), ratios against both.
Every time includes a ``sync`` after the command (durable against durable); reported: wall,
user and system CPU seconds, output bytes, files and directories, and command / floor.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from convert import Run, io_floor, make_ckpt, run_measured, tree_counts

UCP = str(Path(sys.executable).with_name("ucp"))
#: name -> (command after ``ucp``, with {u} and {out}; what the floor reads below the universal checkpoint)
COMMANDS = {
    "reshard dp=4,zero=2 (ucp)": (["reshard", "{u}", "{out}", "--to", "dp=4,zero=2"], "*"),
    "reshard dp=4,zero=2 (deepspeed-universal)": (["reshard", "{u}", "{out}", "--to", "dp=4,zero=2",
                                                   "--engine", "deepspeed-universal"], "*"),
    "export --dtype bf16": (["export", "{u}", "{out}", "--dtype", "bf16"], "param/c*"),
}


def universal(root: Path, out: Path, shape: str) -> Path:
    """The universal checkpoint (under ``out``) of the large DeepSpeed checkpoint (under
    ``root``), converted once."""
    u = out / "universal-large"
    if not (u / "zarr.json").exists():
        run_measured([UCP, "convert", str(make_ckpt(root, "large", shape)), str(u), "-q"])
    return u


def bench(root: Path, u: Path, repeats: int) -> dict[str, dict[str, list]]:
    res: dict[str, dict[str, list]] = {name: {"cmd": [], "floor": [], "floor_direct": [], "out": []}
                                       for name in COMMANDS}
    for _ in range(repeats):
        for name, (args, reads) in COMMANDS.items():
            out = root / "out"
            r = res[name]
            r["cmd"].append(run_measured([UCP, *(a.format(u=u, out=out) for a in args)]))
            r["out"].append(tree_counts(out))
            shutil.rmtree(out)
            r["floor"].append(io_floor(u, r["out"][-1][0], root / "floor", reads))
            r["floor_direct"].append(io_floor(u, r["out"][-1][0], root / "floor", reads, mode="direct"))
    return res


def report(res: dict[str, dict[str, list]], u: Path) -> None:
    print(f"universal checkpoint: {tree_counts(u)[0] / 1e9:.2f} GB; durable (sync included); medians")
    print("| command | output GB | files | dirs | wall s | user s | sys s | floor s (buffered / O_DIRECT) "
          "| / floor (buffered / O_DIRECT) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in res.items():
        cmd = Run(*(statistics.median(getattr(x, f) for x in r["cmd"]) for f in Run.__dataclass_fields__))
        floors = [statistics.median(x.wall for x in r[k]) for k in ("floor", "floor_direct")]
        ratios = [statistics.median(c.wall / f.wall for c, f in zip(r["cmd"], r[k])) for k in ("floor", "floor_direct")]
        b, files, dirs = r["out"][0]
        print(f"| `ucp {name}` | {b / 1e9:.2f} | {files} | {dirs} | {cmd.wall:.2f} | {cmd.user:.2f} | "
              f"{cmd.system:.2f} | {floors[0]:.2f} / {floors[1]:.2f} | {ratios[0]:.2f} / {ratios[1]:.2f} |")
    for name, r in res.items():
        print(f"{name}: per run (command / floor buffered / floor O_DIRECT, wall s; command CPU s): "
              + ", ".join(f"{c.wall:.2f}/{f.wall:.2f}/{g.wall:.2f}; {c.user + c.system:.2f}"
                          for c, f, g in zip(r["cmd"], r["floor"], r["floor_direct"])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ucp-bench-convert"),
                   help="where the DeepSpeed checkpoint is made (once) and kept")
    p.add_argument("--out", type=Path, default=None, help="where the outputs go (default: --dir)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large", default="1024,12,32000", help="hidden,layers,vocab (about 217M params)")
    args = p.parse_args()
    out = args.out or args.dir
    for d in (args.dir, out):
        d.mkdir(parents=True, exist_ok=True)
    u = universal(args.dir, out, args.large)
    report(bench(out, u, args.repeats), u)


if __name__ == "__main__":
    main()
