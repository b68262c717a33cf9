"""Runs ucp's fault-injection and hostile-input trials and writes the report, docs/reliability.md.

Faults are injected into real runs (two ranks on gloo, a moto S3 server behind a proxy that can
cut every connection, an fsspec filesystem that fails a share of its calls, a disk that fills up,
a real tmpfs that does, bit flips in every file ucp writes); the trials are those of
``tests/reliability/_trials.py``, which the tests run a few of. Hostile inputs are the test cases
and fuzzers of ``tests/reliability`` (and of ``tests/engines`` and ``tests/grammar`` where those
already cover a class), run here with larger example counts.

Usage::

    .venv/bin/python scripts/reliability.py                 # the full counts (about 20 minutes)
    .venv/bin/python scripts/reliability.py --quick --out /tmp/r.md   # a smoke run
    .venv/bin/python scripts/reliability.py --kill 100 --json         # figures on stdout too

Progress goes to stderr; the exit status is 1 if any trial lost data or went undetected.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))


@dataclasses.dataclass
class FaultRow:
    title: str
    fault: str
    expect: str
    trials: int = 0
    injected: int = 0
    detected: int = 0
    recovered: int = 0
    errors: int = 0
    lost: int = 0
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)
    examples: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.detected == self.injected and self.recovered == self.trials


@dataclasses.dataclass
class HostileRow:
    title: str
    what: str
    tests: list[str]
    cases: int = 0
    examples: int = 0
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.passed > 0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_trials(row: FaultRow, n: int, trial: Callable[[int, Path], Any]) -> FaultRow:
    start = time.monotonic()
    for seed in range(n):
        with tempfile.TemporaryDirectory(prefix="ucp-reliability-") as d:
            out = trial(seed, Path(d))
        row.trials += 1
        row.injected += out.injected
        row.detected += out.injected and out.detected
        row.recovered += out.recovered
        row.errors += out.error
        row.lost += out.lost
        bad = out.lost or not out.recovered or (out.injected and not out.detected)
        if bad and len(row.problems) < 5:
            row.problems.append(f"seed {seed}: {out.note}")
        if len(row.examples) < 3 and out.injected and not bad and out.note not in row.examples:
            row.examples.append(out.note)
        _progress(f"  {row.title} {seed + 1}/{n}: {'PROBLEM ' if bad else ''}{out.note[:150]}")
    row.seconds = time.monotonic() - start
    return row


def run_pytest(row: HostileRow, *, fuzz_examples: int) -> HostileRow:
    """Runs test node ids in a subprocess; counts cases and hypothesis examples."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ucp-reliability-") as d:
        xml = Path(d) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
               f"--junitxml={xml}", "--hypothesis-show-statistics", *row.tests]
        env = {**os.environ, "UCP_FUZZ_EXAMPLES": str(fuzz_examples)}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if not xml.exists():
            row.failed, row.problems = 1, [proc.stdout[-800:] + proc.stderr[-800:]]
            return row
        suite = ET.parse(xml).getroot()
        for case in suite.iter("testcase"):
            row.cases += 1
            failure = case.find("failure") if case.find("failure") is not None else case.find("error")
            if failure is not None:
                row.failed += 1
                if len(row.problems) < 5:
                    row.problems.append(f"{case.get('name')}: {(failure.get('message') or '')[:300]}")
            elif case.find("skipped") is not None:
                row.skipped += 1
            else:
                row.passed += 1
    row.examples = sum(int(m) for m in re.findall(r"- (\d+) passing, \d+ failing", proc.stdout))
    row.seconds = time.monotonic() - start
    _progress(f"  {row.title}: {row.passed}/{row.cases} cases passed"
              + (f", {row.examples} fuzz examples" if row.examples else ""))
    return row


# -- the classes --------------------------------------------------------------------------------

def fault_rows(args: argparse.Namespace) -> list[FaultRow]:
    import _trials
    from ucp.testing import run_ranks

    rows = []
    _progress("SIGKILL of a saving rank")
    rows.append(run_trials(FaultRow(
        "SIGKILL of a saving rank",
        "2 ranks save a stream of steps (keep=2); one, chosen at random, is SIGKILLed at a named "
        "failpoint (staging, write, index, gather, commit) on a random save, or by a timer at a random "
        "moment (0.05-1.5 s: staging, writing, checksumming, waiting, retention)",
        "the survivor's save raises naming the missing rank; every committed step loads bit for bit, "
        "the newest committed step is at least the newest acknowledged one and is what load() returns; "
        "a new job saves into the same root"),
        args.kill, lambda seed, d: _trials.kill_trial(seed, d, run_ranks)))
    server = _trials.S3Server()
    try:
        for phase in ("save", "load"):
            _progress(f"S3 outage during a {phase}")
            rows.append(run_trials(FaultRow(
                f"S3 server stopped and restarted during a {phase}",
                f"moto S3 on 127.0.0.1 behind a TCP proxy: as the {phase} reaches a random one of its files, "
                "every connection is reset, new ones refused and the server stopped; it restarts after "
                "0.05-0.6 s (even seeds) or 3-5 s (odd seeds)",
                "short outages are retried through; long ones end in a StorageError/SaveError naming the "
                "file and the exhausted retries; a failed save never leaves a committed step; the previous "
                "step always loads bit for bit"),
                args.outage, lambda seed, d, phase=phase: _trials.s3_outage_trial(server, seed, phase=phase)))
    finally:
        server.stop()
    rates = (0.1, 0.3, 0.5)
    _progress("transient I/O errors")
    rows.append(run_trials(FaultRow(
        "Transient I/O errors (fsspec wrapper)",
        "every call of an fsspec filesystem fails with probability 10% / 30% / 50% (connection reset, "
        "timeout, EIO; half the failing writes fail after taking effect) during 4 saves (keep=2), a "
        "convert and universal reads",
        "retried within the bound (5 attempts): everything succeeds and reads back bit for bit; or, when "
        "one call fails five times in a row (likely at 50%), a StorageError naming the file and the "
        "exhausted attempts; every step a save acknowledged loads back bit for bit either way"),
        args.transient, lambda seed, d: _trials.transient_trial(seed, d, fail_rate=rates[seed % len(rates)])))
    _progress("failure past the retry bound")
    rows.append(run_trials(FaultRow(
        "Transient errors past the bound, on one rank",
        "2 ranks save; every write of one rank's store fails",
        "the save fails on every rank, each naming that rank and the 5 exhausted attempts; the previous "
        "step stays the newest and loads bit for bit"),
        args.bound, lambda seed, d: _trials.bound_trial(seed, d, run_ranks)))
    _progress("disk full (injected)")
    rows.append(run_trials(FaultRow(
        "Disk full (ENOSPC injected mid-write)",
        "writes below the root share a random byte budget (0 to all of step 2); the write that crosses "
        "it is cut short and the next raises ENOSPC: in the shard, the rank index, the manifest or `latest`",
        "a SaveError saying 'No space left on device' (or success when only `latest` failed: the step "
        "is committed); step 1 intact; no temporary files and no files of the failed step left"),
        args.enospc, _trials.enospc_trial))
    if _trials.can_mount_tmpfs():
        _progress("disk full (real tmpfs)")
        rows.append(run_trials(FaultRow(
            "Disk full (a real 4 MiB tmpfs)",
            "a tmpfs in a private mount namespace (unshare -rm); step 2 just about does not fit beside step 1",
            "as above, with the kernel's own ENOSPC; afterwards a smaller save (keep=1) works"),
            args.tmpfs, _trials.real_enospc_trial))
    else:
        _progress("disk full (real tmpfs): skipped, unshare/tmpfs not available")
    return rows + job_rows(args)


def job_rows(args: argparse.Namespace) -> list[FaultRow]:
    import _trials_jobs

    _progress("two jobs on one root")
    writers = run_trials(FaultRow(
        "Two jobs saving into one root",
        "two jobs (separate processes, as a restarted job beside the old one, or two launches with one "
        "URL) save steps 1-6 (keep=2) into one root at the same moment, with random 0-0.2 s pauses",
        "each step is committed by one job; the other's save fails naming that job (its live claim on the "
        "step, or its commit); every committed step loads bit for bit as its job saved it, no step a job "
        "acknowledged and retention keeps is lost or holds the other job's data; a later save works"),
        args.writers, _trials_jobs.two_writers_trial)
    _progress("hard-linked snapshots")
    snapshots = run_trials(FaultRow(
        "Hard-linked snapshots (cp -al) of an overwritten root",
        "a native root and a universal checkpoint are snapshotted with `cp -al` (as rsync --link-dest and "
        "backup tools do); then a step is saved again with overwrite=True, a new step's retention (keep=1) "
        "deletes the old ones, and `ucp convert --overwrite` rewrites the universal checkpoint",
        "no file of a snapshot changes (ucp writes new files and renames, never into an existing one); the "
        "snapshots load and verify; the new data reads back"),
        args.snapshots, _trials_jobs.snapshot_trial)
    return [writers, snapshots]


DAMAGE_ORDER = ["shard", "rank index", "manifest", "latest", "universal metadata", "array metadata",
                "zarr chunk", "zarr group"]


def damage_rows(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], float]:
    import _trials

    _progress("bit flips, truncation and deletion in every file type")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ucp-reliability-") as d:
        stats = _trials.damage_trials(Path(d), flips=args.flips, truncations=args.truncations, seed=0)
    for kind, row in stats.items():
        _progress(f"  {kind}: {row['trials']} trials, {row['named']} named, {row['harmless']} harmless, "
                  f"{row['silent']} silent, {row['crash']} crash")
    return stats, time.monotonic() - start


def hostile_rows(args: argparse.Namespace) -> list[HostileRow]:
    R, E, G = "tests/reliability/", "tests/engines/", "tests/grammar/"
    rows = [
        HostileRow("Pickle payload in a DeepSpeed .pt (and DCP metadata)",
                   "a torch zip / raw pickle whose unpickling would run code (os.system-style globals, or an "
                   "allowed stand-in called with hostile arguments), in DeepSpeed files and DCP .metadata/values; "
                   "each test checks the payload's side effect is absent",
                   [f"{E}test_deepspeed_reader.py::test_pickle_payload_is_refused_without_running",
                    f"{E}test_deepspeed_reader.py::test_payload_through_an_allowed_name_is_refused",
                    f"{E}test_dcp_reader.py::test_hostile_metadata_pickle_is_refused_without_running",
                    f"{E}test_dcp_reader.py::test_hostile_value_blob_is_refused_without_running"]),
        HostileRow("Names that try to leave the checkpoint root",
                   "19 names (`../`, absolute paths, NUL, 5000 characters, `zarr.json`, `manifest.json`, "
                   "newline, RTL override...) as ucp state keys, DeepSpeed ZeRO-2/3 parameter names, DCP keys "
                   "and universal names; table paths and state names with `..`, `/`, NUL; DeepSpeed tags, DCP "
                   "data paths and native tags that leave the directory",
                   [f"{R}test_hostile_names.py", f"{R}test_universal_integrity.py::test_table_path_cannot_leave_the_root",
                    f"{R}test_hostile_meta.py::test_native_tag_that_is_not_a_step",
                    f"{E}test_deepspeed_reader.py::test_tag_that_leaves_the_directory_is_refused",
                    f"{E}test_dcp_reader.py::test_data_path_outside_directory_is_refused"]),
        HostileRow("Oversized or malformed metadata, huge or negative shapes, dtype confusion",
                   "16 GiB (sparse) manifests, rank indexes and zarr metadata; malformed JSON (100,000-deep "
                   "nesting, 5000-digit numbers, bad UTF-8, 1e999); consistent (sealed) rank indexes and "
                   "universal tables with negative shapes, 2^50-element global shapes, 4 GiB / 32 TiB arrays in "
                   "tiny chunks, dtypes that disagree with the data; an expanded 2^28-element tensor in a 2 KB "
                   "DeepSpeed file; missing and damaged zarr metadata",
                   [f"{R}test_oversized.py", f"{R}test_hostile_meta.py", f"{R}test_universal_integrity.py",
                    f"{R}test_fuzz_deepspeed.py::test_overlapping_view_is_refused_before_reading"]),
        HostileRow("Fuzzing: manifest and fragment-table readers",
                   "hypothesis: random bytes into loads(); a real manifest and rank index with 1-3 values "
                   "anywhere replaced (junk, huge and negative numbers, ucp's own tags), deleted or duplicated; "
                   "fuzzed rank indexes sealed and recorded in the manifest, then loaded end to end",
                   [f"{R}test_fuzz_meta.py"]),
        HostileRow("Fuzzing: DeepSpeed reader metadata",
                   "hypothesis: the unpickled structures of ZeRO-1/2/3 checkpoints with values anywhere replaced "
                   "(junk, numbers up to 2^63, torch.Size, tensors with other shapes/strides/offsets/dtypes) or "
                   "deleted; open, list and read every state",
                   [f"{R}test_fuzz_deepspeed.py::test_reader_metadata"]),
        HostileRow("Fuzzing: UCL parser (existing tests)",
                   "hypothesis: random text and grammar-shaped specs through the parser and the layout engine",
                   [f"{G}test_ucl_parse.py::test_fuzz_parser_raises_only_spec_errors",
                    f"{G}test_ucl_parse.py::test_fuzz_semantics_raise_only_spec_errors"]),
        HostileRow("Special files where a checkpoint has regular ones",
                   "a FIFO or a link to /dev/zero as a manifest, rank index or shard (a FIFO blocks every "
                   "reader; /dev/zero says 0 bytes and never ends); a FIFO as `latest`; 16 GiB (sparse) HF "
                   "index, universal zarr.json, rank index and `latest` through inspect, verify and ls",
                   [f"{R}test_special_files.py", f"{R}test_oversized.py::test_oversized_metadata_named_by_every_reader"]),
        HostileRow("Case folding",
                   "parameters `Wq.weight` and `wq.weight` (one directory on macOS, Windows, SMB shares) "
                   "converted, and a universal table whose paths differ only in case",
                   ["tests/core/test_case_folding.py"]),
        HostileRow("Hostile name patterns",
                   "a spec with `{a:**}{b:**}...x` (exponential for a backtracking matcher) against a "
                   "3000-character name; hypothesis: random patterns and names, captures compared with "
                   "Python's regex",
                   [f"{G}test_pattern_linear.py"]),
        HostileRow("Links and copied manifests in a root",
                   "a step directory that is a link to another root's step (retention must not delete "
                   "through it); a step's manifest copied into another step's directory",
                   ["tests/core/test_hostile_root.py"]),
        HostileRow("Object-store credentials",
                   "a secret as s3fs storage options and as `-o secret=` of the CLI, in URLs (user:password@, "
                   "token@, X-Amz-Signature=, sig=); save/load/convert/open/inspect/ls/verify succeeding and "
                   "failing (no bucket, server down, bad options); every logger captured at DEBUG",
                   [f"{R}test_secrets.py"]),
    ]
    for row in rows:
        _progress(row.title)
        run_pytest(row, fuzz_examples=args.fuzz_examples)
    return rows


# -- the report ---------------------------------------------------------------------------------

FIXES = [
    ("7b0ae91", "a bit flip in a manifest's spec/topology or in the universal metadata (e.g. an lr) was "
                "read silently: metadata documents now carry a checksum of their own content"),
    ("ce84315", "oversized metadata files were read whole before their size was checked"),
    ("dcc1dbd (see 12e99c0)", "a flipped digit in a zarr array's shape or chunk separator, or a deleted chunk, "
                             "read as zeros; damaged zarr metadata raised bare TypeError/ZeroDivisionError; "
                             "a hostile shape in tiny chunks made zarr plan millions of reads"),
    ("214186b", "zarr reads and writes had no retries; a transient error was reported as damaged metadata"),
    ("665d5a2", "a failed save left its step's files (keeping the space a disk-full needs back); a full disk "
                "while updating `latest` failed a save whose step was committed"),
    ("ceff128", "a missing file of a committed step escaped as a bare FileNotFoundError"),
    ("38af9e5", "the manifest reader let TypeError/OverflowError/KeyError escape"),
    ("8202bae", "a rank index claiming a huge DTensor global shape was allocated before being checked; "
                "a tag that is not a step raised ValueError"),
    ("e7b50e1", "a DTensor state loaded in one process raised torch's bare ValueError"),
    ("042ba12", "a parameter named `zarr.json` made conversion fail"),
    ("2a28777", "an expanded (stride-0) tensor in a 2 KB DeepSpeed file allocated 1 GiB"),
    ("7bc01bc", "12 kinds of malformed DeepSpeed metadata escaped as bare Python errors"),
    ("e3f7c06", "an unreachable ftp/sftp server escaped as a bare OSError, without retries"),
    ("d833301", "credentials inside a URL were printed in errors and logs"),
    ("946b96a", "exhausted retries while `ucp convert` checked a step's files were reported as a missing "
                "file (\"restore it\")"),
    ("e92ba7b", "4 of 2105 bit flips in an array's `zarr.json` (a digit of its chunk shape) were reported "
                "as a damaged chunk, not as damaged metadata: the table now records each array "
                "metadata file's CRC32C"),
    ("4e835be", "two jobs saving into one root (a restarted job beside the old one) could both commit one "
                "step (unloadable), and one's retention or cleanup deleted the other's step in progress: "
                "steps are claimed before they are written and committed create-if-absent"),
    ("79ca6dd", "`ucp convert --overwrite` rewrote universal files in place, changing hard-linked snapshots "
                "(`cp -al`, rsync --link-dest), and destroyed the old output before the new one fitted"),
    ("d5551a4", "`Wq.weight` and `wq.weight` read the same directory on case-insensitive filesystems"),
    ("97ca097", "a spec pattern `{a:**}{b:**}...x` made the name matcher backtrack for days"),
    ("745e36c", "a FIFO in a checkpoint hung every reader; a link to /dev/zero defeated every size bound; "
                "`latest`, the HF index and zarr.json were read whole"),
    ("ae8d918", "a multi-shard export cut short read as a model with part of its tensors"),
    ("6d57284", "retention deleted another root's manifest through a step directory that is a link"),
]


def render(faults: list[FaultRow], damage: dict[str, dict[str, Any]], damage_s: float,
           hostile: list[HostileRow], args: argparse.Namespace, elapsed: float) -> str:
    import torch
    import zarr

    lost = sum(r.lost for r in faults) + sum(d["silent"] for d in damage.values())
    lines = [
        "# Reliability and security report",
        "",
        "<!-- Generated by scripts/reliability.py; do not edit by hand. -->",
        "",
        f"Generated by `scripts/reliability.py{' ' + ' '.join(args.argv) if args.argv else ''}` on "
        f"{datetime.date.today().isoformat()} (Python {platform.python_version()}, torch {torch.__version__}, "
        f"zarr {zarr.__version__}, {os.cpu_count()} CPU cores, {elapsed / 60:.0f} min). "
        "Every trial below is reproducible from its seed; `pytest tests/reliability` runs a few of each "
        "(`-m slow` more).",
        "",
        f"**Data lost: {lost}** (a step a save acknowledged that does not load back bit for bit, or any "
        "read that returned different data without an error).",
        "",
        "## Faults",
        "",
        "| Fault | Trials | Fault hit | Detected | Recovered | Ended in a clear error | Data lost |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in faults:
        lines.append(f"| {r.title} | {r.trials} | {r.injected} | {r.detected} | {r.recovered} | {r.errors} | "
                     f"{r.lost} |")
    lines += ["", "*Fault hit*: the fault really happened during the operation (a timer that fired after "
              "the last save does not count). *Detected*: ucp noticed it and handled it: retried through it, "
              "or raised an error naming the cause (the dead rank, the file, the exhausted retries, "
              "'No space left on device'). *Recovered*: afterwards every committed step loads bit for bit, "
              "and the operation succeeded or the next one does.", ""]
    for r in faults:
        lines += [f"**{r.title}** ({r.seconds:.0f} s). {r.fault}. Expected: {r.expect}."]
        if r.examples:
            lines += ["", "Examples:", *[f"- `{e[:220]}`" for e in r.examples[:2]]]
        if r.problems:
            lines += ["", "Problems:", *[f"- `{p[:300]}`" for p in r.problems]]
        lines.append("")
    lines += [
        "## Bit flips, truncation and deletion",
        "",
        f"A two-rank native step and a universal checkpoint converted from a model: each file in turn gets "
        f"{args.flips} single-bit flips at random offsets (every byte of smaller files), {args.truncations} "
        "truncations at random lengths and a deletion; then everything is read (`ucp.load` of every rank; "
        f"`ucp.open` and every state of every parameter and the metadata). {damage_s:.0f} s.",
        "",
        "| File type | Files | Trials | Detected, naming the file | Harmless (reads back identical) | "
        "Detected, file not named | Read back different data | Other exception |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in [k for k in DAMAGE_ORDER if k in damage] + [k for k in damage if k not in DAMAGE_ORDER]:
        d = damage[kind]
        lines.append(f"| {kind} | {d['files']} | {d['trials']} | {d['named']} | {d['harmless']} | {d['unnamed']} | "
                     f"{d['silent']} | {d['crash']} |")
    lines += ["", "Harmless trials change nothing a reader uses: the name of a document's own `checksum` key, "
              "JSON keys zarr has defaults for, `latest` (readers trust manifests, not `latest`), the zarr group "
              "nodes `params/zarr.json` (not read). Deleting a manifest or the universal `zarr.json` un-commits "
              "the step or checkpoint, as designed; the error says so.", ""]
    for kind, d in damage.items():
        for e in d["examples"]:
            lines.append(f"- {kind}: `{e[:250]}`")
    lines += [
        "",
        "## Hostile input",
        "",
        "| Input | Test cases | Fuzz examples | Handled as required | Failed |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in hostile:
        lines.append(f"| {r.title} | {r.cases} | {r.examples or '-'} | {r.passed} | {r.failed} |")
    lines += ["", "*Handled as required*: refused with a UcpError naming the file (the payload's side effect "
              "absent, nothing written or read outside the root, memory bounded by what the files hold), or "
              "read back exactly when the input is merely odd; fuzzers: only a UcpError escapes.", ""]
    for r in hostile:
        lines += [f"**{r.title}** ({r.seconds:.0f} s). {r.what}. Tests: " + ", ".join(f"`{t}`" for t in r.tests) + "."]
        if r.problems:
            lines += ["", "Problems:", *[f"- `{p[:300]}`" for p in r.problems]]
        lines.append("")
    lines += ["## What these trials found (fixed)", "",
              "Each was fixed in its own commit, with the test that found it:", ""]
    lines += [f"- `{c}`: {t}." for c, t in FIXES]
    lines += ["", "## Not covered here", "",
              "- Third-party DEBUG logging: fsspec's http filesystem logs URLs verbatim at DEBUG; ucp redacts "
              "its own records and errors, and its CLI shows only ucp's logger.",
              "- A universal checkpoint's shard files hold no name of their own: a shard file swapped with "
              "another shard of the same array (valid CRCs) is not detected.",
              "- Faults on GPUs (CUDA staging) and on real object stores other than moto.", ""]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--kill", type=int, default=50, help="SIGKILL trials")
    p.add_argument("--outage", type=int, default=20, help="S3 outage trials, each for save and for load")
    p.add_argument("--transient", type=int, default=30, help="flaky-filesystem trials")
    p.add_argument("--bound", type=int, default=10, help="past-the-bound trials (two ranks)")
    p.add_argument("--enospc", type=int, default=50, help="injected disk-full trials")
    p.add_argument("--tmpfs", type=int, default=10, help="real tmpfs disk-full trials")
    p.add_argument("--writers", type=int, default=10, help="two-jobs-on-one-root trials")
    p.add_argument("--snapshots", type=int, default=10, help="hard-linked snapshot trials")
    p.add_argument("--flips", type=int, default=400, help="bit flips per file")
    p.add_argument("--truncations", type=int, default=20, help="truncations per file")
    p.add_argument("--fuzz-examples", type=int, default=1000, help="hypothesis examples per fuzz test")
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 trials of each, small sweeps")
    p.add_argument("--out", default=str(ROOT / "docs" / "reliability.md"), help="the report to write")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON on stdout")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        for name in ("kill", "outage", "transient", "bound", "enospc", "tmpfs", "writers", "snapshots"):
            setattr(args, name, min(getattr(args, name), 2))
        args.flips, args.truncations, args.fuzz_examples = 8, 2, 20
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ucp_log = logging.getLogger("ucp")  # retries and failures are the point here: counted, not shown
    ucp_log.addHandler(logging.NullHandler())
    ucp_log.propagate = False
    start = time.monotonic()
    faults = fault_rows(args)
    damage, damage_s = damage_rows(args)
    hostile = hostile_rows(args)
    elapsed = time.monotonic() - start
    report = render(faults, damage, damage_s, hostile, args, elapsed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    _progress(f"wrote {args.out} ({elapsed / 60:.1f} min)")
    ok = all(r.ok for r in faults) and all(r.ok for r in hostile) and all(
        d["silent"] == 0 and d["crash"] == 0 and d["unnamed"] == 0 for d in damage.values())
    if args.json:
        print(json.dumps({"faults": [dataclasses.asdict(r) for r in faults], "damage": damage,
                          "hostile": [dataclasses.asdict(r) for r in hostile], "ok": ok,
                          "seconds": round(elapsed, 1)}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
