"""benchmarks/scale.py at a small rank count: the simulation keeps running ucp's real code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ucp.testing import run_command, scaled_timeout

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"


def run_scale(tmp_path: Path, *extra: str) -> dict:
    out = run_command([sys.executable, str(SCRIPT), "--ranks", "16", "--model", "llama-8b",
                       "--source", "tp=2,pp=4,dp=2,zero=1", "--target", "tp=2,pp=2,dp=4,zero=1",
                       "--dir", str(tmp_path), "--json", *extra],
                      what="benchmarks/scale.py", timeout=scaled_timeout(300))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_scale_simulation_commits_and_plans(tmp_path: Path) -> None:
    r = run_scale(tmp_path)
    step = tmp_path / "step-00001000"
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["world_size"] == 16 and len(manifest["files"]) >= 32
    assert r["metadata_bytes"] == sum(p.stat().st_size for p in step.glob("*.json"))
    assert r["plan_tensors"] > 0 and r["plan_reads"] >= r["plan_tensors"]
    assert r["commit_s"] > 0 and r["commit_peak_rss_bytes"] > 0
    assert 0 < r["dcp_metadata_bytes"]
    # the resuming rank reads the manifest and one rank index per pipeline stage (the catalog's
    # groups), not every rank's; the other ranks' indexes hold only what differs
    reps = [g["index"] for g in manifest["catalog"]]
    assert reps == [0, 4, 8, 12]
    read = [step / "manifest.json", *(step / f"rank-{i:05d}.json" for i in reps)]
    assert r["plan_read_bytes"] == sum(p.stat().st_size for p in read)
    member = json.loads((step / "rank-00001.json").read_text())
    assert member["like"] == 0 and "fragments" not in member
