"""Fault trials shared by the reliability tests (a few trials each) and ``scripts/reliability.py``
(the full counts, for ``docs/reliability.md``).

Every trial returns an :class:`Outcome`: whether the fault was injected, whether ucp detected it
(an error that names the cause), whether it recovered (the operation succeeded after retries, or
the previous checkpoint is intact and a later save works), and how much data was lost: a step
that a save acknowledged but that cannot be loaded bit for bit, or any load that returned
different data without an error. Rank functions live here, at module level, for ``run_ranks``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

import ucp
from ucp import testing_faults as tf
from ucp.native._layout import committed_steps
from ucp.storage import Storage

FAILPOINTS = ("save.staging", "save.write", "save.index", "save.gather", "save.commit")


@dataclasses.dataclass
class Outcome:
    """One trial. ``detected``: ucp noticed the fault and handled it (retried through it, or
    raised a clear error naming the cause). ``recovered``: afterwards everything committed loads
    bit for bit and work goes on (the operation succeeded, or a later one does). ``error``: the
    operation itself ended in that clear error. ``lost``: data that did not come back exactly."""

    injected: bool = True
    detected: bool = False
    recovered: bool = False
    error: bool = False
    lost: int = 0
    note: str = ""


def state(rank: int, step: int, numel: int = 250_000) -> dict[str, Any]:
    """A deterministic state: the same (rank, step) always gives the same bytes."""
    g = torch.Generator().manual_seed(7919 * rank + step)
    return {"model": {"w": torch.randn(numel, generator=g), "b": torch.randn(64, generator=g).bfloat16()},
            "optim": {"lr": 1e-3, "count": torch.tensor(step)}, "rank": rank, "step": step}


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested states (tensors: dtype, shape and bytes)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.numel() else a,
                             b.view(torch.uint8) if b.dtype.is_floating_point and b.numel() else b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def audit(url: str, world: int, acked: int, *, storage_options: dict | None = None,
          numel: int = 250_000) -> tuple[int, str]:
    """Loads every rank of every committed step and compares it with what was saved.

    Returns (data lost, note): a committed step that fails to load or differs counts one, and so
    does an acknowledged step (``acked``: the newest step whose save returned) newer than the
    newest committed one, or a default load that does not return the newest committed step.
    """
    steps = committed_steps(Storage(url, storage_options=storage_options))
    lost, notes = 0, []
    if acked and (not steps or steps[-1] < acked):
        lost += 1
        notes.append(f"acknowledged step {acked} missing (committed: {steps})")
    for s in steps:
        for r in range(world):
            try:
                ok = same(ucp.load(url, step=s, rank=r, storage_options=storage_options), state(r, s, numel))
            except ucp.UcpError as e:
                ok = False
                notes.append(f"step {s} rank {r}: {type(e).__name__}: {e}")
            if not ok:
                lost += 1
                notes.append(f"step {s} rank {r} does not load back bit for bit")
    if steps:
        newest = ucp.load(url, rank=0, storage_options=storage_options)["step"]
        if newest != steps[-1]:
            lost += 1
            notes.append(f"load() returned step {newest}, newest committed is {steps[-1]}")
    return lost, "; ".join(notes)


# -- SIGKILL of a saving rank --------------------------------------------------------------------

def save_until_killed(rank: int, world: int, root: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Saves steps 1..n (keep=2); the victim dies by a failpoint or a timer (``plan``)."""
    torch.set_num_threads(1)
    victim = rank == plan["victim"]  # -1 (and mode "none"): nobody dies
    if victim and plan["mode"] == "timer":
        tf.kill_after(plan["delay"])
    acked: list[int] = []
    deadline = time.monotonic() + 60.0  # a timer that has not fired by then never will
    for step in range(1, plan["steps"] + 1):
        if time.monotonic() > deadline:
            break
        if victim and plan["mode"] == "failpoint" and step == plan["at_step"]:
            os.environ["UCP_FAILPOINT"] = f"{plan['point']}:kill"
        try:
            ucp.save(state(rank, step, plan["numel"]), root, step=step, keep=2, timeout=plan["timeout"]).wait()
        except ucp.SaveError as e:
            return {"acked": acked, "error": f"{type(e).__name__}: {e}"}
        acked.append(step)
    return {"acked": acked, "error": None}


def kill_plan(seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    plan = {"victim": rng.randrange(2), "numel": 500_000, "timeout": 8.0, "seed": seed}
    if seed % 2 == 0:  # a named failpoint on a random save
        plan.update(mode="failpoint", point=FAILPOINTS[(seed // 2) % len(FAILPOINTS)], at_step=rng.randint(2, 5),
                    steps=5)
    else:  # a timer: anywhere (staging, writing, checksumming, waiting, retention...); the ranks
        # keep saving until it fires
        plan.update(mode="timer", delay=rng.uniform(0.05, 1.5), steps=100_000)
    return plan


def kill_trial(seed: int, root: Path, run_ranks: Callable[..., Any]) -> Outcome:
    """Two ranks save five steps; one is SIGKILLed at a random point. Then: every committed step
    loads bit for bit, no acknowledged step is lost, and a new save (keep=2) works."""
    plan = kill_plan(seed)
    url = str(root)
    results = run_ranks(save_until_killed, 2, args=(url, plan), check=False, timeout=180)
    victim, survivor = results[plan["victim"]], results[1 - plan["victim"]]
    killed = victim.exitcode == -9
    acked = max([*(survivor.value or {}).get("acked", []), *(victim.value or {}).get("acked", [])], default=0)
    out = Outcome(injected=killed)
    if killed and survivor.value is not None:
        err = survivor.value.get("error") or ""
        out.error = bool(err)
        # the survivor's save failed naming what happened (or the kill came after its last save)
        out.detected = not err or "did not" in err or "rank" in err
    lost, note = audit(url, 2, acked, numel=plan["numel"])
    out.lost = lost
    # a new job takes over the same root (one process): it must save and load
    try:
        ucp.save(state(0, 100, 1000), url, step=100, keep=2).wait()
        out.recovered = lost == 0 and same(ucp.load(url, rank=0), state(0, 100, 1000))
    except ucp.UcpError as e:
        note += f"; follow-up save failed: {e}"
    where = plan.get("point") or f"t={plan.get('delay', 0):.2f}s"
    err = ((survivor.value or {}).get("error") or "-").splitlines()[0][:200]
    out.note = f"victim rank {plan['victim']} at {where}: exit {victim.exitcode}, acked {acked}; " \
        f"survivor: {err}" + (f"; {note}" if note else "")
    return out


# -- the S3 server stopped and restarted ----------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 on 127.0.0.1 behind a :class:`~ucp.testing_faults.TcpProxy`. ``stop()`` is an
    outage: the proxy resets every connection and refuses new ones, and the moto server itself is
    stopped; ``start()`` restarts it and reopens the proxy on the same port. The objects live in
    this process, so they survive the restart, as on a real store after an outage."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.moto_port = _free_port()
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self._server: Any = None
        self._start_moto()
        self.proxy = tf.TcpProxy(self.moto_port)
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"

    def _start_moto(self) -> None:
        for _ in range(50):  # the port may linger for a moment after stop()
            try:
                self._server = self._cls(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
                self._server.start()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"cannot restart moto on port {self.moto_port}")

    def stop(self) -> None:
        self.proxy.down()
        self._server.stop()

    def start(self) -> None:
        self._start_moto()
        self.proxy.up()

    def options(self, secret: str = "testing-secret") -> dict[str, Any]:
        return {"key": "testing-key", "secret": secret, "client_kwargs": {"endpoint_url": self.endpoint},
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1, "read_timeout": 5},
                "use_listings_cache": False, "skip_instance_cache": True}

    def bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(**self.options()).mkdir(name)
        return f"s3://{name}/ckpt"


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "retry" in record.getMessage()


SAVE_FILES = ("rank-00000.safetensors", "rank-00000.json", "manifest.json", "latest")
LOAD_FILES = ("manifest.json", "rank-00000.json", "rank-00000.safetensors")


def s3_outage_trial(server: S3Server, seed: int, *, phase: str, until_done: bool = False) -> Outcome:
    """The server goes away just as a save (or a load) reaches a random one of its files, and
    comes back 0.05..0.6 s (short) or 3..5 s (long) later. ucp's default policy retries for about
    0.75 s, so short outages recover and long ones end in a clear StorageError/SaveError; a failed
    save never leaves a committed step behind, and the previous step stays loadable. With
    ``until_done`` the server stays down until the operation has given up."""
    rng = random.Random(seed)
    length = rng.uniform(0.05, 0.6) if seed % 2 == 0 else rng.uniform(3.0, 5.0)
    length = 3600.0 if until_done else length
    target = rng.choice(SAVE_FILES if phase == "save" else LOAD_FILES)
    url = server.bucket(f"outage-{phase}-{seed}")
    opts = server.options()
    numel = 500_000
    ucp.save(state(0, 1, numel), url, step=1, storage_options=opts).wait()
    retries, fired, timers = _Retries(), threading.Event(), []
    method = "write" if phase == "save" else "read"
    real = getattr(Storage, method)

    def hooked(self: Storage, rel: str, *args: Any, **kwargs: Any) -> Any:
        if rel.endswith(target) and not fired.is_set():
            fired.set()
            server.stop()
            timers.append(threading.Timer(length, server.start))
            timers[0].start()
        return real(self, rel, *args, **kwargs)

    out, error = Outcome(), None
    setattr(Storage, method, hooked)
    logging.getLogger("ucp").addHandler(retries)
    try:
        if phase == "save":
            ucp.save(state(0, 2, numel), url, step=2, storage_options=opts).wait()
        else:
            out.lost += int(not same(ucp.load(url, storage_options=opts), state(0, 1, numel)))
    except ucp.UcpError as e:
        error = e
    finally:
        setattr(Storage, method, real)
        logging.getLogger("ucp").removeHandler(retries)
    for t in timers:
        if until_done:
            t.cancel()
            server.start()
        t.join()  # the server is back
    acked = 2 if phase == "save" and error is None else 1
    lost, note = audit(url, 1, acked, storage_options=opts, numel=numel)
    out.lost += lost
    out.injected = fired.is_set()
    out.error = error is not None
    # retried through (by ucp, or by s3fs below it), or an error naming the file and the retries
    out.detected = error is None or ("attempts" in str(error) and target in str(error))
    out.recovered = lost == 0  # the operation succeeded, or the previous step is intact and the
    # failed one not committed: the next save/load works once the store is back
    out.note = (f"{phase}, outage {length:.2f}s at {target}, {retries.count} retries: "
                f"{'ok' if error is None else type(error).__name__ + ': ' + str(error)[:200]}"
                + (f"; {note}" if note else ""))
    return out


# -- transient errors from an fsspec filesystem ---------------------------------------------------

def transient_trial(seed: int, root: Path, *, fail_rate: float) -> Outcome:
    """Four saves (keep=2), a convert and universal reads through a store that fails
    ``fail_rate`` of its calls. Every fault is retried through, or (when one call fails five times
    in a row: likely at 50%) ends in a StorageError naming the file and the exhausted attempts;
    either way every step a save acknowledged loads back bit for bit."""
    tf.install()
    tf.injected_counts(reset=True)
    opts = {"fail_rate": fail_rate, "seed": seed}
    url = tf.flaky_url(root / "n")
    out, error, acked = Outcome(), None, 0
    try:
        for step in range(1, 5):
            ucp.save(state(0, step, 50_000), url, step=step, keep=2, storage_options=opts).wait()
            acked = step
        ucp.convert(url, tf.flaky_url(root / "u"), storage_options=opts, dst_storage_options=opts,
                    progress=False)
        ckpt = ucp.open(tf.flaky_url(root / "u"), storage_options=opts)
        out.lost += int(not same(ckpt.read("w"), state(0, 4, 50_000)["model"]["w"]))
    except ucp.UcpError as e:
        error = e
    counts = tf.injected_counts()
    lost, note = audit(url, 1, acked, storage_options={"fail_rate": 0.0}, numel=50_000)
    out.lost += lost
    out.injected = counts["faults"] > 0
    out.error = error is not None
    out.detected = error is None or ("after 5 attempts" in str(error) and "ucpflaky://" in str(error))
    out.recovered = out.lost == 0  # what was acknowledged is intact; the next attempt starts clean
    out.note = (f"{fail_rate:.0%} failing: {counts['faults']} faults in {counts['calls']} calls; "
                f"{'ok' if error is None else type(error).__name__ + ': ' + str(error)[:200]}"
                + (f"; {note}" if note else ""))
    return out


# -- disk full -------------------------------------------------------------------------------------

def enospc_trial(seed: int, root: Path) -> Outcome:
    """ENOSPC after a random number of bytes of step 2 (shard, index, manifest or `latest`)."""
    rng = random.Random(seed)
    numel = 50_000
    ucp.save(state(0, 1, numel), str(root), step=1).wait()
    total = sum(p.stat().st_size for p in (root / "step-00000001").iterdir()) + 16
    free = rng.randrange(0, total + 64)
    out, error = Outcome(), None
    with tf.disk_full(root, free_bytes=free) as left:
        try:
            ucp.save(state(0, 2, numel), str(root), step=2).wait()
        except ucp.SaveError as e:
            error = e
    out.injected = left[0] == 0
    partials = [f for _, _, fs in os.walk(root) for f in fs if ".partial" in f]
    step2 = root / "step-00000002"
    committed = committed_steps(Storage(str(root)))
    leftover = step2.exists() and 2 not in committed
    lost, note = audit(str(root), 1, 2 if error is None else 1, numel=numel)
    out.lost = lost
    out.error = error is not None
    out.detected = error is None or "No space left on device" in str(error)
    out.recovered = lost == 0 and not partials and not leftover
    out.note = (f"{free} of {total} bytes free: {'committed' if error is None else 'SaveError'}"
                f"{'; partial files left' if partials else ''}{'; step files left' if leftover else ''}"
                + (f"; {note}" if note else ""))
    shutil.rmtree(root, ignore_errors=True)
    return out


# -- bit flips, truncation and deletion in every file ucp writes ----------------------------------

def file_kind(rel: str) -> str:
    """The kind of a file of a native root (``n/...``) or a universal checkpoint (``u/...``)."""
    name = rel.rsplit("/", 1)[-1]
    if rel.startswith("n/"):
        return {"manifest.json": "manifest", "latest": "latest"}.get(
            name, "shard" if name.endswith(".safetensors") else "rank index")
    if rel == "u/zarr.json":
        return "universal metadata"
    if name == "zarr.json":
        return "array metadata" if rel.count("/") >= 4 else "zarr group"
    return "zarr chunk"


def make_checkpoints(root: Path) -> dict[str, Any]:
    """A native checkpoint (two steps, two ranks' files written by one process through
    ``write_rank_files``) and its universal conversion; returns what reads must give back."""
    from ucp.native._save import write_manifest, write_rank_files
    from ucp.core._tree import flatten

    native, universal = root / "n", root / "u"
    st = Storage(str(native))
    files = {}
    for rank in (0, 1):
        s = state(rank, 2, 4096)
        tree, tensors = flatten(s)
        staged = {k: t.clone() for k, (_, t) in tensors.items()}
        from ucp.native._save import _stage
        staged, fragments, _ = _stage(tensors)
        files.update(write_rank_files(st, step=2, rank=rank, world_size=2, tree=tree, staged=staged,
                                      fragments=fragments))
    from ucp.native._meta import FileRecord
    write_manifest(st, step=2, world_size=2, topology=ucp.Topology.parse("dp=2"),
                   spec=None, files={k: FileRecord.from_dict(v) for k, v in files.items()})
    model = {"model": {"w": torch.randn(300, 40), "b": torch.randn(40).bfloat16(), "z": torch.zeros(7)},
             "optim": {"state": {"w": {"exp_avg": torch.randn(300, 40)}},
                       "param_groups": [{"params": ["w"], "lr": 1e-3}]}}
    ucp.save(model, str(root / "m"), step=3).wait()
    ucp.convert(str(root / "m"), str(universal), progress=False)
    return {"native": {r: state(r, 2, 4096) for r in (0, 1)}, "universal": read_universal(universal)}


def read_native(native: Path) -> dict[int, Any]:
    return {r: ucp.load(str(native), rank=r) for r in (0, 1)}


def read_universal(universal: Path) -> dict[str, Any]:
    ckpt = ucp.open(str(universal))
    meta = {k: v for k, v in ckpt.metadata.items() if k in ("step", "source", "spec", "param_groups",
                                                           "params", "buffers", "aliases", "format_version")}
    return {"meta": meta, **{f"{n}/{s}": ckpt.read(n, s) for n in ckpt.names() for s in ckpt.info(n).states}}


def damage_trials(root: Path, *, flips: int, truncations: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Flips random bits (``flips`` per file, every byte of small files when ``flips`` is larger),
    truncates (``truncations`` per file) and deletes each file of both checkpoints in turn, reads,
    and classifies each trial: ``named`` (a UcpError naming the damaged file), ``unnamed`` (a
    UcpError that does not name it), ``harmless`` (everything reads back identical), ``silent``
    (reads back different data: data lost) or ``crash`` (any other exception)."""
    rng = random.Random(seed)
    expected = make_checkpoints(root)
    stats: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.parts[-len(p.relative_to(root).parts)] in "nu"):
        rel = path.relative_to(root).as_posix()
        kind = file_kind(rel)
        raw = path.read_bytes()
        n = len(raw)
        positions = list(range(n)) if n <= flips else rng.sample(range(n), flips)
        trials = [("flip", i, rng.randrange(8)) for i in positions]
        trials += [("truncate", rng.randrange(n) if n else 0, 0) for _ in range(truncations)]
        trials += [("delete", 0, 0)]
        row = stats.setdefault(kind, {"files": 0, "trials": 0, "named": 0, "unnamed": 0, "harmless": 0,
                                      "silent": 0, "crash": 0, "examples": []})
        row["files"] += 1
        for how, pos, bit in trials:
            if how == "delete":
                path.unlink()
            elif how == "truncate":
                path.write_bytes(raw[:pos])
            else:
                b = bytearray(raw)
                b[pos] ^= 1 << bit
                path.write_bytes(bytes(b))
            result, msg = _classify(root, rel, expected, deleted=how == "delete")
            path.write_bytes(raw)
            row["trials"] += 1
            row[result] += 1
            if result in ("unnamed", "silent", "crash") and len(row["examples"]) < 5:
                row["examples"].append(f"{rel} {how}@{pos}: {msg[:200]}")
    return stats


def _classify(root: Path, rel: str, expected: dict[str, Any], *, deleted: bool) -> tuple[str, str]:
    native = rel.startswith("n/")
    try:
        got = read_native(root / "n") if native else read_universal(root / "u")
    except ucp.UcpError as e:
        msg = str(e)
        named = str(root / rel) in msg
        if deleted and rel.endswith(("manifest.json", "u/zarr.json")):
            # without its commit record the step (checkpoint) is, by design, not committed
            named = isinstance(e, ucp.CheckpointNotFoundError) and rel.rsplit("/", 1)[-1].split(".")[0] in msg
        return ("named" if named else "unnamed"), msg
    except Exception as e:  # noqa: BLE001 - that is what the trial looks for
        return "crash", f"{type(e).__name__}: {e}"
    want = expected["native"] if native else expected["universal"]
    return ("harmless" if same(got, want) else "silent"), ""


# -- failure past the retry bound, on one rank of two -------------------------------------------

def save_with_dead_store(rank: int, world: int, root: str, victim: int, step: int) -> dict[str, Any]:
    tf.install()
    opts = {"fail_rate": 1.0 if rank == victim else 0.0, "ops": ["pipe_file"], "seed": rank}
    try:
        ucp.save(state(rank, step, 20_000), tf.flaky_url(root), step=step, storage_options=opts,
                 timeout=60).wait()
    except ucp.SaveError as e:
        return {"error": str(e)}
    return {"error": None}


def bound_trial(seed: int, root: Path, run_ranks: Callable[..., Any]) -> Outcome:
    """One rank's store fails every write: each rank's save must fail naming that rank and the
    exhausted retries; the previous step stays the newest, bit for bit."""
    victim = random.Random(seed).randrange(2)
    url = str(root)
    run_ranks(save_until_killed, 2, args=(url, {"victim": -1, "mode": "none", "steps": 1, "numel": 20_000,
                                                "timeout": 60.0}), timeout=120)
    results = run_ranks(save_with_dead_store, 2, args=(url, victim, 2), check=False, timeout=120)
    errors = [(r.value or {}).get("error") or "" for r in results]
    out = Outcome(error=all(errors))
    out.detected = all(f"rank {victim}: StorageError" in e and "after 5 attempts" in e for e in errors)
    lost, note = audit(url, 2, 1, numel=20_000)
    out.lost = lost
    out.recovered = lost == 0 and committed_steps(Storage(url)) == [1]
    out.note = f"rank {victim}'s store dead: " + " | ".join(e.splitlines()[0][:120] for e in errors) + \
        (f"; {note}" if note else "")
    return out


# -- a real full filesystem: a small tmpfs in a private mount namespace ---------------------------

REAL_ENOSPC = r"""
import os, sys, json, torch, ucp
from ucp.native._layout import committed_steps
from ucp.storage import Storage
root, first, second = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ucp.save({"w": torch.ones(first)}, root, step=1).wait()
try:
    ucp.save({"w": torch.full((second,), 2.0)}, root, step=2).wait()
    error = None
except ucp.SaveError as e:
    error = str(e)
steps = committed_steps(Storage(root))
intact = bool((ucp.load(root, step=1)["w"] == 1).all())
partials = [f for d, _, fs in os.walk(root) for f in fs if ".partial" in f]
leftover = os.path.exists(os.path.join(root, "step-00000002")) and 2 not in steps
again = None
try:
    ucp.save({"w": torch.full((first,), 3.0)}, root, step=3, keep=1).wait()
    again = bool((ucp.load(root)["w"] == 3).all())
except ucp.SaveError as e:
    again = str(e)
print(json.dumps({"error": error, "steps": steps, "intact": intact, "partials": partials,
                  "leftover": leftover, "again": again}))
"""


def can_mount_tmpfs() -> bool:
    import subprocess

    if shutil.which("unshare") is None:
        return False
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def real_enospc_trial(seed: int, root: Path) -> Outcome:
    """A 4 MiB tmpfs (unshare -rm): step 1 takes 0.4..1.6 MB, and step 2 just about does not fit
    beside it, so the disk fills up in its shard, its index or its manifest."""
    import json
    import subprocess
    import sys

    rng = random.Random(seed)
    first = rng.randrange(100_000, 400_000)  # float32 elements
    room = (4 * 2**20 - first * 4) // 4  # what is left, about: step 2 fails somewhere near its end
    second = room - rng.randrange(0, 6000)
    mnt = root / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    script = root / "real.py"
    script.write_text(REAL_ENOSPC)
    cmd = (f"mount -t tmpfs -o size=4m none {mnt} && exec {sys.executable} {script} {mnt}/ckpt "
           f"{first} {second}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", cmd], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return Outcome(injected=False, note=proc.stderr[-300:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    out = Outcome(error=r["error"] is not None)
    out.injected = out.error  # the disk filled up (else step 2 fitted: not a trial of this fault)
    out.detected = out.error and "No space left on device" in r["error"]
    out.lost = int(not r["intact"]) + int(r["steps"] not in ([1], [1, 2]))
    out.recovered = r["intact"] and not r["partials"] and not r["leftover"] and r["again"] is True
    out.note = f"{first * 4} + {second * 4} bytes on 4 MiB: {json.dumps(r)[:300]}"
    return out
