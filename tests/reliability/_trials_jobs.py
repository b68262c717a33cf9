"""Trials of what happens around a job rather than inside it: two jobs saving into one root at
once, and hard-linked snapshots of a root taken before it is overwritten. Shared by
``tests/reliability`` and ``scripts/reliability.py`` (which counts them for docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import ucp
from ucp.native._layout import committed_steps, read_manifest
from ucp.ops._verify import verify_checkpoint
from ucp.storage import Storage
from ucp.testing import subprocess_env

if __package__:
    from ._trials import Outcome, same
else:  # run by scripts/reliability.py with this folder on sys.path
    from _trials import Outcome, same

# -- two jobs on one root ------------------------------------------------------------------------

WRITER = r"""
import json, os, random, sys, time
import torch, ucp
from ucp.native._claim import job_id
root, seed, me = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(2 * seed + me)
open(os.path.join(os.path.dirname(root), f"ready-{me}"), "w").close()
while not all(os.path.exists(os.path.join(os.path.dirname(root), f"ready-{j}")) for j in (0, 1)):
    time.sleep(0.01)  # both imports done: start together
acked, errors = [], []
for step in range(1, 7):
    time.sleep(rng.uniform(0, 0.2))
    g = torch.Generator().manual_seed(1000 * me + step)
    try:
        ucp.save({"w": torch.randn(100_000, generator=g), "job": me, "step": step}, root, step=step,
                 keep=2).wait()
        acked.append(step)
    except ucp.UcpError as e:
        errors.append([step, type(e).__name__, str(e)])
print(json.dumps({"job": job_id(), "acked": acked, "errors": errors}))
"""


def writer_state(me: int, step: int) -> dict[str, Any]:
    """What writer ``me`` saves as ``step`` (the same bytes as the WRITER script)."""
    g = torch.Generator().manual_seed(1000 * me + step)
    return {"w": torch.randn(100_000, generator=g), "job": me, "step": step}


def _audit_two_writers(url: str, runs: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """Every committed step loads as its committing job saved it; every acknowledged step that
    retention (keep=2) had to keep is still there, committed by the job that acknowledged it."""
    storage, lost, notes = Storage(url), 0, []
    jobs = {r["job"]: me for me, r in enumerate(runs)}
    steps = committed_steps(storage)
    for s in steps:
        me = jobs.get(read_manifest(storage, s).job)
        try:
            ok = me is not None and same(ucp.load(url, step=s), writer_state(me, s))
        except ucp.UcpError as e:
            ok, _ = False, notes.append(f"step {s}: {type(e).__name__}: {e}")
        if not ok:
            lost += 1
            notes.append(f"step {s} (job {me}) does not load back as saved")
    kept = min(steps[-2:], default=0)  # older steps: retention may have deleted them (and the
    for me, r in enumerate(runs):      # other job may have saved such a step again since)
        for s in (s for s in r["acked"] if s >= kept):
            gone = s not in steps
            theirs = not gone and jobs.get(read_manifest(storage, s).job) != me
            if gone or theirs:
                lost += 1
                notes.append(f"job {me} acknowledged step {s}, which is {'gone' if gone else 'the other job'}'s")
    return lost, notes


def two_writers_trial(seed: int, root: Path) -> Outcome:
    """Two jobs (separate processes, no shared process group) save steps 1-6 (keep=2) into one
    root at the same time, with random pauses: each step is committed by one of them, the other
    gets an error naming the other job, and nothing either acknowledged is lost or mixed."""
    url = str(root / "ckpt")
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, url, str(seed), str(me)], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    if any(p.returncode for p in procs):
        return Outcome(injected=False, note="; ".join(e[-300:] for _, e in outs))
    runs = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    errors = [e for r in runs for e in r["errors"]]
    out = Outcome(injected=bool(errors), error=bool(errors))
    # every refusal names the other job (and says why: its live claim, or its commit)
    out.detected = all(runs[1 - me]["job"] in e[2] for me, r in enumerate(runs) for e in r["errors"])
    out.lost, notes = _audit_two_writers(url, runs)
    try:
        ucp.save(writer_state(0, 100), url, step=100).wait()
        out.recovered = out.lost == 0 and same(ucp.load(url), writer_state(0, 100))
    except ucp.UcpError as e:
        notes.append(f"follow-up save failed: {e}")
    acked = [r["acked"] for r in runs]
    out.note = (f"acknowledged {acked[0]} / {acked[1]}, committed {committed_steps(Storage(url))}; "
                f"{len(errors)} refused" + (f": {errors[0][2][:160]}" if errors else "")
                + "".join(f"; {n}" for n in notes))
    return out


# -- hard-linked snapshots -----------------------------------------------------------------------

def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _model(seed: int, version: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 * seed + version)
    return {"model": {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)},
            "version": version}


def snapshot_trial(seed: int, root: Path) -> Outcome:
    """A native root and a universal checkpoint are snapshotted with ``cp -al`` (as rsync
    --link-dest and backup tools do); then the root gets an overwritten step, a new step whose
    retention (keep=1) deletes the old ones, and the universal checkpoint is converted again
    with ``overwrite``. The snapshots must keep every byte, and still load and verify."""
    rng = random.Random(seed)
    ckpt, uni = root / "ckpt", root / "universal"
    steps = sorted(rng.sample(range(1, 50), 2))
    for s in steps:
        ucp.save(_model(seed, s), str(ckpt), step=s).wait()
    ucp.convert(str(ckpt), str(uni), progress=False)
    for src, dst in ((ckpt, root / "snap"), (uni, root / "usnap")):
        subprocess.run(["cp", "-al", str(src), str(dst)], check=True)
    before = {"snap": _digests(root / "snap"), "usnap": _digests(root / "usnap")}
    ucp.save(_model(seed, 1000), str(ckpt), step=steps[-1], overwrite=True).wait()
    ucp.save(_model(seed, 2000), str(ckpt), step=steps[-1] + 1, keep=1).wait()
    ucp.convert(str(ckpt), str(uni), overwrite=True, progress=False)
    changed = [f"{k}/{f}" for k in before for f, h in before[k].items() if _digests(root / k).get(f) != h]
    out = Outcome(detected=True, lost=len(changed))
    reads = all(same(ucp.load(str(root / "snap"), step=s), _model(seed, s)) for s in steps) and \
        verify_checkpoint(str(root / "usnap")).ok and verify_checkpoint(str(root / "snap")).ok
    new = torch.equal(ucp.open(str(uni)).read("w", "fp32"), _model(seed, 2000)["model"]["w"])
    out.lost += int(not reads)
    out.recovered = out.lost == 0 and new
    out.note = (f"steps {steps} snapshotted, step {steps[-1]} overwritten, step {steps[-1] + 1} saved "
                f"(keep=1), universal converted again: {len(changed)} snapshot files changed"
                + (f" ({', '.join(changed[:3])})" if changed else "") + f", snapshots read back "
                f"{'identical' if reads else 'DIFFERENT'}, new data {'read' if new else 'NOT read'}")
    return out

