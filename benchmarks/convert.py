"""Conversion benchmark: `ucp convert` vs DeepSpeed's `ds_to_universal` on a real ZeRO-2 bf16 checkpoint.

    .venv/bin/python benchmarks/convert.py [--dir /work/bench] [--repeats 3] [--workers 1] [--sizes small,large]

Makes (once, cached under --dir) real DeepSpeed ZeRO-2 bf16 checkpoints on 2 ranks with
``make_deepspeed_ckpt.py`` at two model sizes (--small/--large as hidden,layers,vocab), then, side
by side in one run (each run: ucp, ds_to_universal, floor, in turn), medians of --repeats, per size:
  * ``ucp convert SRC DST --workers W``;
  * ``python -m deepspeed.checkpoint.ds_to_universal --num_extract_workers W --num_merge_workers W``;
  * the durable I/O floor: a process that reads every input byte and writes as many bytes as ucp
    wrote to one file, then fsyncs it.
Durable against durable: every command's time includes a ``sync`` after it (ucp fsyncs only its
commit record; ds_to_universal and the floor's page cache would otherwise hide their write-back);
each command starts after an untimed ``sync``. Reported per command: durable wall time (and the
``sync`` part), user and system CPU seconds of its process tree, peak RSS (summed over the tree,
sampled every 20 ms), and the output's bytes, files and directories.
Targets (issues 4, 18): ucp >= 3x faster than ds_to_universal and within 1.3x the durable floor,
<= 0.5x its peak RSS, wall time growing about linearly with bytes between the two sizes.

    .venv/bin/python benchmarks/convert.py --verify-cost [--repeats 3] [--workers 1]

instead measures what fingerprinting costs (issue 16: <= 10%): on the large checkpoint only,
``ucp convert --no-verify`` and ``ucp convert`` (fingerprints checked and recorded) one after the
other in each run, each made durable; it prints each run side by side and the median of the
per-run ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent

#: The floor as a process of its own (interpreter start included, like the others): read every
#: input file (below a directory, matching a pattern), write ``out_bytes`` to one new file in
#: 16 MiB blocks, fsync it.
FLOOR = """
import os, sys
from pathlib import Path
src, out, left = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pattern = sys.argv[4] if len(sys.argv) > 4 else "*"
for f in sorted(p for p in src.rglob(pattern) if p.is_file()):
    with open(f, "rb", buffering=0) as fh:
        while fh.read(16 << 20):
            pass
block = memoryview(bytearray(16 << 20))
with open(out, "wb", buffering=0) as fh:
    while left > 0:
        left -= fh.write(block[:min(left, len(block))])
    os.fsync(fh.fileno())
"""


@dataclasses.dataclass
class Run:
    """One measured command: seconds (``wall`` includes the ``sync`` after it), CPU seconds of
    its process tree, peak RSS bytes."""

    wall: float
    sync: float
    user: float
    system: float
    rss: int


def _peak_rss(pid: int, done: threading.Event, out: list[int]) -> None:
    root = psutil.Process(pid)
    while not done.is_set():
        try:
            procs = [root, *root.children(recursive=True)]
            out[0] = max(out[0], sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.02)


def run_measured(cmd: list[str]) -> Run:
    """Runs ``cmd``, then ``sync``; its time, CPU time and peak RSS (see :class:`Run`)."""
    os.sync()  # every measured command starts with no dirty pages of the one before
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    done, peak = threading.Event(), [0]
    t = threading.Thread(target=_peak_rss, args=(proc.pid, done, peak), daemon=True)
    t.start()
    _, err = proc.communicate()
    t1 = time.perf_counter()
    os.sync()  # durable: what the command left in the page cache reaches the disk
    t2 = time.perf_counter()
    done.set()
    t.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return Run(wall=t2 - t0, sync=t2 - t1, user=after.ru_utime - before.ru_utime,
               system=after.ru_stime - before.ru_stime, rss=peak[0])


def tree_counts(path: Path) -> tuple[int, int, int]:
    """(bytes, files, directories) below ``path``."""
    nbytes = files = dirs = 0
    for top, dnames, fnames in os.walk(path):
        dirs += len(dnames)
        files += len(fnames)
        nbytes += sum(os.path.getsize(os.path.join(top, f)) for f in fnames)
    return nbytes, files, dirs


def io_floor(src: Path, out_bytes: int, scratch: Path, pattern: str = "*") -> Run:
    """The durable I/O floor (see :data:`FLOOR`: the files below ``src`` matching ``pattern``
    read, ``out_bytes`` written), measured like the commands."""
    scratch.mkdir(parents=True, exist_ok=True)
    run = run_measured([sys.executable, "-c", FLOOR, str(src), str(scratch / "floor.bin"), str(out_bytes), pattern])
    shutil.rmtree(scratch)
    return run


def make_ckpt(root: Path, label: str, shape: str) -> Path:
    out = root / f"ds-{label}"
    if not (out / "latest").exists():
        hidden, layers, vocab = shape.split(",")
        subprocess.run([sys.executable, str(HERE / "make_deepspeed_ckpt.py"), str(out), "--hidden", hidden,
                        "--layers", layers, "--vocab", vocab, "--stage", "2", "--dtype", "bf16"], check=True)
    return out


def bench_size(root: Path, src: Path, repeats: int, workers: int) -> dict[str, list]:
    """``repeats`` rounds of ucp, ds_to_universal and the floor, in turn; per kind a list of
    :class:`Run` (and ``"ucp_out"``/``"ds_out"``/``"in"``: bytes, files, directories)."""
    tag = (src / "latest").read_text().strip()
    ucp_bin = str(Path(sys.executable).with_name("ucp"))
    res: dict[str, list] = {k: [] for k in ("ucp", "ds", "floor", "ucp_out", "ds_out", "in")}
    for i in range(repeats):
        dst, ds_out = root / f"u-{i}", root / f"dsu-{i}"
        res["ucp"].append(run_measured([ucp_bin, "convert", str(src), str(dst), "--workers", str(workers), "-q"]))
        res["ds"].append(run_measured([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                                       "--input_folder", str(src / tag), "--output_folder", str(ds_out),
                                       "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]))
        res["ucp_out"].append(tree_counts(dst))
        res["ds_out"].append(tree_counts(ds_out))
        res["in"].append(tree_counts(src / tag))
        res["floor"].append(io_floor(src / tag, res["ucp_out"][-1][0], root / "floor"))
        shutil.rmtree(dst)
        shutil.rmtree(ds_out)
    return res


def _median_run(runs: list[Run]) -> Run:
    return Run(*(statistics.median(getattr(r, f.name) for r in runs) for f in dataclasses.fields(Run)))


def report(label: str, res: dict[str, list]) -> None:
    """Prints one size's table: medians per command, then each run side by side."""
    print(f"{label}: input {res['in'][0][0] / 1e9:.2f} GB in {res['in'][0][1]} files")
    print(f"  {'command':16s} {'wall s':>7s} {'sync s':>7s} {'user s':>7s} {'sys s':>7s} {'RSS GB':>7s}"
          f" {'out GB':>7s} {'files':>6s} {'dirs':>6s}")
    for kind, out in (("ucp", "ucp_out"), ("ds", "ds_out"), ("floor", None)):
        m = _median_run(res[kind])
        b, f, d = res[out][0] if out else (res["ucp_out"][0][0], 1, 0)
        name = {"ucp": "ucp convert", "ds": "ds_to_universal", "floor": "durable floor"}[kind]
        print(f"  {name:16s} {m.wall:7.2f} {m.sync:7.2f} {m.user:7.2f} {m.system:7.2f} {m.rss / 1e9:7.2f}"
              f" {b / 1e9:7.2f} {f:6d} {d:6d}")
    trips = ", ".join(f"{u.wall:.2f}/{d.wall:.2f}/{f.wall:.2f}" for u, d, f in
                      zip(res["ucp"], res["ds"], res["floor"]))
    speed = statistics.median(d.wall / u.wall for u, d in zip(res["ucp"], res["ds"]))
    floor = statistics.median(u.wall / f.wall for u, f in zip(res["ucp"], res["floor"]))
    rss = statistics.median(u.rss / d.rss for u, d in zip(res["ucp"], res["ds"]))
    print(f"  per run (ucp / ds / floor s, durable): {trips}")
    print(f"  medians of per-run ratios: speedup vs ds_to_universal {speed:.2f}x, ucp / floor {floor:.2f}, "
          f"RSS ucp / ds {rss:.2f}")


def verify_cost(root: Path, src: Path, repeats: int, workers: int) -> None:
    """Side by side: convert without and with fingerprint verification (durable); per-run ratios
    of wall time and of CPU seconds (user + system of the process tree: on a machine loaded by
    other work, the CPU time is the steadier figure of what the fingerprints add)."""
    ucp_bin = str(Path(sys.executable).with_name("ucp"))

    def once(flag: list[str]) -> Run:
        dst = root / "u-verify"
        run = run_measured([ucp_bin, "convert", str(src), str(dst), "--workers", str(workers), "-q", *flag])
        shutil.rmtree(dst)
        return run
    once(["--no-verify"])  # warm-up (page cache), not counted
    pairs = []
    for i in range(repeats):  # the order alternates, so neither side always runs second
        order = ("plain", "verify") if i % 2 == 0 else ("verify", "plain")
        t = {k: once([] if k == "verify" else ["--no-verify"]) for k in order}
        plain, checked = t["plain"], t["verify"]
        pairs.append((plain, checked))
        print(f"run {i}: --no-verify {plain.wall:.2f}s ({plain.user + plain.system:.2f} CPU s), verify "
              f"{checked.wall:.2f}s ({checked.user + checked.system:.2f} CPU s), ratio wall "
              f"{checked.wall / plain.wall:.3f}, CPU {_cpu(checked) / _cpu(plain):.3f}", flush=True)
    wall = statistics.median(v.wall / n.wall for n, v in pairs)
    cpu = statistics.median(_cpu(v) / _cpu(n) for n, v in pairs)
    print(f"median --no-verify {statistics.median(n.wall for n, _ in pairs):.2f}s, verify "
          f"{statistics.median(v.wall for _, v in pairs):.2f}s; median of per-run ratios: wall {wall:.3f} "
          f"(+{(wall - 1) * 100:.1f}%), CPU {cpu:.3f} (+{(cpu - 1) * 100:.1f}%)")


def _cpu(run: Run) -> float:
    return run.user + run.system


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ucp-bench-convert"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--sizes", default="small,large", help="which sizes to run (comma-separated)")
    p.add_argument("--small", default="1024,4,32000", help="hidden,layers,vocab (about 115M params)")
    p.add_argument("--large", default="1024,12,32000", help="hidden,layers,vocab (about 217M params)")
    p.add_argument("--verify-cost", action="store_true",
                   help="only measure convert with vs without fingerprint verification (large size)")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.verify_cost:
        verify_cost(args.dir, make_ckpt(args.dir, "large", args.large), args.repeats, args.workers)
        return
    print(f"ZeRO-2 bf16, 2 ranks; workers={args.workers}; durable (sync included); medians of {args.repeats} runs")
    walls = {}
    for label in args.sizes.split(","):
        src = make_ckpt(args.dir, label, getattr(args, label))
        res = bench_size(args.dir, src, args.repeats, args.workers)
        report(label, res)
        walls[label] = (res["in"][0][0], _median_run(res["ucp"]))
    if {"small", "large"} <= walls.keys():
        (sb, s), (lb, l) = walls["small"], walls["large"]
        print(f"scaling: bytes x{lb / sb:.2f} -> ucp time x{l.wall / s.wall:.2f}, ucp peak RSS x{l.rss / s.rss:.2f}")


if __name__ == "__main__":
    main()
