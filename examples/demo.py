"""The ucp demo: lose a node mid-training, resume on fewer ranks with another layout, same curve.

    python examples/demo.py [--out DIR]          # what `make demo` runs

1. reference: the tiny GPT trains 40 steps on 4 ranks (tp=2 x dp=2) without interruption;
2. elastic: the same job saves asynchronously every 5 steps, and one rank is SIGKILLed at step 23
   ("a node is lost"); the job dies;
3. the job is restarted on the 3 surviving ranks as tp=1 x dp=3: ucp.Checkpointer.resume finds
   the newest committed step (20, unless that save was still being written when the rank died),
   reshards it on the fly, and training continues to step 40.
It prints the losses side by side and writes DIR/loss.png. Nothing needs the network.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 40
CRASH_AT = 23  # the last rank SIGKILLs itself as this step starts: steps 1-22 are logged


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / "train.py"), "--steps", str(STEPS), "--save-every", "5", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def read_losses(path: Path, world: int) -> dict[int, float]:
    """step -> loss of the rows a job of ``world`` ranks logged to ``path``."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {r["step"]: r["loss"] for r in rows if r["world"] == world}


def plot(ref: dict[int, float], killed: dict[int, float], resumed: dict[int, float],
         resumed_at: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(sorted(ref), [ref[s] for s in sorted(ref)], color="0.7", lw=4, label="uninterrupted, 4 ranks")
    ax.plot(sorted(killed), [killed[s] for s in sorted(killed)], "o-", ms=3, zorder=3,  # on top
            label="tp=2 x dp=2 (4 ranks), until a rank is lost")
    ax.plot(sorted(resumed), [resumed[s] for s in sorted(resumed)], "s-", ms=3,
            label="resumed as tp=1 x dp=3 (3 ranks)")
    ax.axvline(CRASH_AT, color="r", ls="--", lw=1, label=f"rank SIGKILLed at step {CRASH_AT}")
    ax.axvline(resumed_at, color="g", ls=":", lw=1, label=f"resumed from step {resumed_at} (newest committed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("ucp: elastic resume keeps the loss curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def print_table(ref: dict[int, float], killed: dict[int, float], resumed: dict[int, float],
                resumed_at: int) -> float:
    """Prints the losses around the loss of the rank; returns the largest relative difference
    between the resumed run and the uninterrupted one."""
    print(f"\n{'step':>4}  {'uninterrupted':>13}  {'4 ranks':>9}  {'3 ranks':>9}")
    marks = {resumed_at: "  <- newest committed step", resumed_at + 1: "  <- resumed here",
             CRASH_AT: "  <- a rank is SIGKILLed"}

    def cell(losses: dict[int, float], s: int) -> str:
        return f"{losses[s]:9.6f}" if s in losses else " " * 9

    for s in range(resumed_at - 2, STEPS + 1):
        print(f"{s:4d}  {ref[s]:13.6f}  {cell(killed, s)}  {cell(resumed, s)}{marks.get(s, '')}".rstrip())
    return max(abs(resumed[s] - ref[s]) / abs(ref[s]) for s in resumed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "ucp-demo")
    args = p.parse_args()
    try:
        import matplotlib  # noqa: F401 - checked before minutes of training, not after
    except ImportError:
        raise SystemExit("the demo draws its loss curve with matplotlib, which is not installed: "
                         "pip install 'ucp[demo]' (or matplotlib), then run it again") from None
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt, ref_ckpt = args.out / "ckpt", args.out / "ckpt-reference"
    ref_log, log = args.out / "reference.jsonl", args.out / "elastic.jsonl"
    for path in (ref_log, log):
        path.unlink(missing_ok=True)
    import shutil

    for path in (ckpt, ref_ckpt):
        shutil.rmtree(path, ignore_errors=True)
    t0 = time.time()
    print("1/3 reference run: 4 ranks (tp=2 x dp=2), 40 steps ...", flush=True)
    r = torchrun(4, "--tp", "2", "--ckpt", str(ref_ckpt), "--loss-log", str(ref_log))
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"2/3 elastic run: 4 ranks (tp=2 x dp=2); a rank is SIGKILLed at step {CRASH_AT} ...", flush=True)
    r = torchrun(4, "--tp", "2", "--ckpt", str(ckpt), "--loss-log", str(log), "--crash-at", str(CRASH_AT))
    assert r.returncode != 0, "the job should have died with its rank"
    print(f"    a rank was SIGKILLed at step {CRASH_AT}; the job died (exit {r.returncode}); committed: "
          f"{sorted(p.name for p in ckpt.glob('step-*') if (p / 'manifest.json').exists())}", flush=True)
    print("3/3 restart on the 3 surviving ranks as tp=1 x dp=3 ...", flush=True)
    r = torchrun(3, "--tp", "1", "--ckpt", str(ckpt), "--loss-log", str(log))
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = next(line for line in (r.stderr + r.stdout).splitlines() if "resumed step" in line)
    print(f"    {resumed.strip()}")
    ref, killed, run = read_losses(ref_log, 4), read_losses(log, 4), read_losses(log, 3)
    resumed_at = int(resumed.split("resumed step")[1].split(":")[0])
    worst = print_table(ref, killed, run, resumed_at)
    print(f"\nafter the resume the curve matches the uninterrupted run: max relative difference {worst:.1e}")
    plot(ref, killed, run, resumed_at, args.out / "loss.png")
    print(f"plot: {args.out / 'loss.png'}   ({time.time() - t0:.0f} s)")
    if worst > 1e-5:
        raise SystemExit("the resumed curve diverged")


if __name__ == "__main__":
    main()
