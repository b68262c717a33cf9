"""Conversion benchmark: `ucp convert` vs DeepSpeed's `ds_to_universal` on a real ZeRO-2 bf16 checkpoint.

    .venv/bin/python benchmarks/convert.py [--dir /tmp/ucp-bench-convert] [--repeats 3] [--workers 2]

Makes (once, cached under --dir) real DeepSpeed ZeRO-2 bf16 checkpoints on 2 ranks with
``make_deepspeed_ckpt.py`` at two model sizes (--small/--large as hidden,layers,vocab), then, side
by side in one run, medians of --repeats, per size:
  * wall time and peak RSS (sum over the process tree, sampled every 20 ms) of
    ``ucp convert SRC DST --workers W`` and of
    ``python -m deepspeed.checkpoint.ds_to_universal --num_extract_workers W --num_merge_workers W``;
  * the I/O floor: reading every input byte and writing as many bytes as ucp wrote, with plain
    file reads/writes.
Each measured command starts after ``sync`` (no dirty pages left by the one before).
Targets (issue 4): >= 3x faster than ds_to_universal, <= 0.5x its peak RSS, within 2x the I/O floor,
and wall time growing about linearly with bytes between the two sizes.

    .venv/bin/python benchmarks/convert.py --verify-cost [--repeats 3] [--workers 2]

instead measures what fingerprinting costs (issue 16: <= 10%): on the large checkpoint only,
``ucp convert --no-verify`` and ``ucp convert`` (fingerprints checked and recorded) one after the
other in each run; it prints each run side by side and the median of the per-run ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Runs ``cmd``; returns (wall seconds, peak RSS bytes summed over its process tree)."""
    os.sync()  # every measured command starts with no dirty pages of the one before
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return wall, peak


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def io_floor(src: Path, out_bytes: int, scratch: Path) -> float:
    """Seconds to read every file under ``src`` and write ``out_bytes`` to new files."""
    os.sync()
    t0 = time.perf_counter()
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass
    block = b"\0" * (16 << 20)
    scratch.mkdir(parents=True, exist_ok=True)
    left = out_bytes
    with open(scratch / "floor.bin", "wb") as fh:
        while left > 0:
            fh.write(block[:min(left, len(block))])
            left -= len(block)
    wall = time.perf_counter() - t0
    shutil.rmtree(scratch)
    return wall


def make_ckpt(root: Path, label: str, shape: str) -> Path:
    out = root / f"ds-{label}"
    if not (out / "latest").exists():
        hidden, layers, vocab = shape.split(",")
        subprocess.run([sys.executable, str(HERE / "make_deepspeed_ckpt.py"), str(out), "--hidden", hidden,
                        "--layers", layers, "--vocab", vocab, "--stage", "2", "--dtype", "bf16"], check=True)
    return out


def bench_size(root: Path, src: Path, repeats: int, workers: int) -> dict[str, list[float]]:
    tag = (src / "latest").read_text().strip()
    ucp_bin = str(Path(sys.executable).with_name("ucp"))
    res: dict[str, list[float]] = {k: [] for k in ("ucp_s", "ucp_rss", "ds_s", "ds_rss", "floor_s")}
    for i in range(repeats):
        dst, ds_out = root / f"u-{i}", root / f"dsu-{i}"
        w, m = run_measured([ucp_bin, "convert", str(src), str(dst), "--workers", str(workers), "-q"])
        res["ucp_s"].append(w)
        res["ucp_rss"].append(m)
        w, m = run_measured([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(src / tag), "--output_folder", str(ds_out), "--num_extract_workers",
                             str(workers), "--num_merge_workers", str(workers)])
        res["ds_s"].append(w)
        res["ds_rss"].append(m)
        out_bytes = tree_bytes(dst)
        res["floor_s"].append(io_floor(src / tag, out_bytes, root / "floor"))
        res.setdefault("in_bytes", []).append(tree_bytes(src / tag))
        res.setdefault("out_bytes", []).append(out_bytes)
        shutil.rmtree(dst)
        shutil.rmtree(ds_out)
    return res


def verify_cost(root: Path, src: Path, repeats: int, workers: int) -> None:
    """Side by side: convert without and with fingerprint verification; per-run ratios."""
    ucp_bin = str(Path(sys.executable).with_name("ucp"))

    def once(flag: list[str]) -> float:
        dst = root / "u-verify"
        w, _ = run_measured([ucp_bin, "convert", str(src), str(dst), "--workers", str(workers), "-q", *flag])
        shutil.rmtree(dst)
        return w
    once(["--no-verify"])  # warm-up (page cache), not counted
    pairs = []
    for i in range(repeats):  # the order alternates, so neither side always runs second
        order = ("plain", "verify") if i % 2 == 0 else ("verify", "plain")
        t = {k: once([] if k == "verify" else ["--no-verify"]) for k in order}
        times = (t["plain"], t["verify"])
        pairs.append(times)
        print(f"run {i}: --no-verify {times[0]:.2f}s, verify {times[1]:.2f}s, ratio {times[1] / times[0]:.3f}",
              flush=True)
    ratio = statistics.median(v / n for n, v in pairs)
    print(f"median --no-verify {statistics.median(n for n, _ in pairs):.2f}s, verify "
          f"{statistics.median(v for _, v in pairs):.2f}s; median of per-run ratios {ratio:.3f} "
          f"(+{(ratio - 1) * 100:.1f}%)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/ucp-bench-convert"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--small", default="1024,4,32000", help="hidden,layers,vocab (about 115M params)")
    p.add_argument("--large", default="1024,12,32000", help="hidden,layers,vocab (about 217M params)")
    p.add_argument("--verify-cost", action="store_true",
                   help="only measure convert with vs without fingerprint verification (large size)")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.verify_cost:
        verify_cost(args.dir, make_ckpt(args.dir, "large", args.large), args.repeats, args.workers)
        return
    rows = {}
    runs = {}
    for label, shape in (("small", args.small), ("large", args.large)):
        src = make_ckpt(args.dir, label, shape)
        runs[label] = bench_size(args.dir, src, args.repeats, args.workers)
        rows[label] = {k: statistics.median(v) for k, v in runs[label].items()}
    print(f"ZeRO-2 bf16, 2 ranks; workers={args.workers}; medians of {args.repeats} runs")
    print(f"{'size':6s} {'input GB':>8s} {'ucp s':>7s} {'ds s':>7s} {'floor s':>7s} {'ucp GB':>7s} {'ds GB':>7s}"
          f" {'speedup':>7s} {'RSS ratio':>9s} {'ucp/floor':>9s}")
    for label, r in rows.items():
        print(f"{label:6s} {r['in_bytes'] / 1e9:8.2f} {r['ucp_s']:7.2f} {r['ds_s']:7.2f} {r['floor_s']:7.2f} "
              f"{r['ucp_rss'] / 1e9:7.2f} {r['ds_rss'] / 1e9:7.2f} {r['ds_s'] / r['ucp_s']:7.1f}x "
              f"{r['ucp_rss'] / r['ds_rss']:9.2f} {r['ucp_s'] / r['floor_s']:9.2f}")
    print("per run (side by side, in order): ucp s / ds s / floor s")
    for label, r in runs.items():
        trips = ", ".join(f"{u:.2f}/{d:.2f}/{f:.2f}" for u, d, f in zip(r["ucp_s"], r["ds_s"], r["floor_s"]))
        speed = statistics.median(d / u for u, d in zip(r["ucp_s"], r["ds_s"]))
        floor = statistics.median(u / f for u, f in zip(r["ucp_s"], r["floor_s"]))
        print(f"{label:6s} {trips}; medians of per-run ratios: speedup {speed:.1f}x, ucp/floor {floor:.2f}")
    s, l = rows["small"], rows["large"]
    print(f"scaling: bytes x{l['in_bytes'] / s['in_bytes']:.2f} -> ucp time x{l['ucp_s'] / s['ucp_s']:.2f}, "
          f"ucp peak RSS x{l['ucp_rss'] / s['ucp_rss']:.2f}")


if __name__ == "__main__":
    main()
