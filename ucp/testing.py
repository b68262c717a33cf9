"""Run a function on N ranks of a real gloo process group on 127.0.0.1 (tests, benchmarks).

Every multi-process test of ucp goes through :func:`run_ranks`. Ranks are fresh processes
(``spawn``); the function must be defined at module level in a ``.py`` file, which each rank
imports by path, so it works for test modules that are not importable by name.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from ucp.native._claim import pid_alive  # noqa: F401 - public here too: tests check that processes ended

__all__ = ["run_ranks", "RankResult", "RankFailure", "scaled_timeout", "timeout_scale", "subprocess_env",
           "run_command", "pid_alive"]


@dataclasses.dataclass
class RankResult:
    """What one rank returned (``value``), or how it failed (``error`` / ``exitcode``)."""

    rank: int
    exitcode: int | None
    value: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and self.error is None


class RankFailure(AssertionError):
    """Some rank raised, died or timed out; the message holds every rank's outcome."""


def _load_function(path: str, name: str) -> Callable[..., Any]:
    spec = importlib.util.spec_from_file_location(f"_ucp_rank_mod_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, name)


def _child(path: str, name: str, rank: int, world_size: int, init_file: str, args: Sequence[Any],
           env: Mapping[str, str], timeout: float, conn: Any) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: tuple[str, Any]
    try:
        fn = _load_function(path, name)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        result = ("error", traceback.format_exc())
    try:
        conn.send(result)
    except Exception:  # noqa: BLE001 - an unpicklable value is reported as an error
        conn.send(("error", traceback.format_exc()))
    conn.close()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - teardown after a failure
            pass
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *, args: Sequence[Any] = (),
              env: Mapping[str, str] | None = None, rank_env: Mapping[int, Mapping[str, str]] | None = None,
              timeout: float = 180.0, check: bool = True) -> list[RankResult]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` processes joined in a gloo group.

    Args:
        fn: a module-level function of a ``.py`` file.
        world_size: number of ranks.
        args: extra positional arguments (picklable).
        env: environment variables for every rank; ``rank_env`` adds per-rank ones.
        timeout: seconds for the whole run (and the process group's collective timeout).
        check: raise :class:`RankFailure` unless every rank returned normally.

    Returns:
        One :class:`RankResult` per rank, in rank order.
    """
    path = os.path.abspath(fn.__code__.co_filename)
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ucp-ranks-") as tmp:
        init_file = os.path.join(tmp, "init")
        procs, conns = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            renv = {**(env or {}), **((rank_env or {}).get(rank, {}))}
            p = ctx.Process(target=_child, args=(path, fn.__name__, rank, world_size, init_file,
                                                 tuple(args), renv, timeout, child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        results = _collect(procs, conns, timeout)
    if check and not all(r.ok for r in results):
        raise RankFailure(_describe(results))
    return results


def _collect(procs: list[Any], conns: list[Any], timeout: float) -> list[RankResult]:
    deadline = time.monotonic() + timeout
    results: list[RankResult] = []
    for rank, (p, conn) in enumerate(zip(procs, conns)):
        value, error = None, None
        remaining = max(0.1, deadline - time.monotonic())
        if conn.poll(remaining):
            try:
                status, payload = conn.recv()
                value, error = (payload, None) if status == "ok" else (None, payload)
            except EOFError:
                error = "died without reporting"
        else:
            error = "timed out" if p.is_alive() else "died without reporting"
        p.join(max(0.1, min(10.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join(5)
        results.append(RankResult(rank=rank, exitcode=p.exitcode, value=value, error=error))
    return results


def _describe(results: list[RankResult]) -> str:
    lines = []
    for r in results:
        state = "ok" if r.ok else f"FAILED (exit code {r.exitcode})"
        lines.append(f"--- rank {r.rank}: {state}")
        if r.error:
            lines.append(r.error.rstrip())
    return "\n".join(lines)


#: Seconds a fresh interpreter takes to ``import torch`` on a quiet reference machine (2 vCPUs,
#: torch 2.13 CPU build); the unit of :func:`timeout_scale`.
_REFERENCE_TORCH_IMPORT_S = 1.5
_MAX_SCALE = 8.0  # past this the machine is too loaded to be worth waiting for: fail, and say so
_SCALE_ENV = "UCP_TEST_TIMEOUT_SCALE"
_scale: float | None = None  # measured once per process


def timeout_scale() -> float:
    """How many times slower than a quiet reference machine this one is now (at least 1).

    ``UCP_TEST_TIMEOUT_SCALE`` (a number), when set, is the answer. Otherwise a fresh interpreter's
    ``import torch`` is timed once per process and compared with the reference machine's: it
    pays for CPU, disk and contention alike, as the multi-process tests do. Capped at 8.

    Returns:
        The factor to multiply fixed test timeouts by (:func:`scaled_timeout`).
    """
    global _scale
    if _scale is None:
        given = os.environ.get(_SCALE_ENV)
        if given:
            try:
                _scale = max(1.0, float(given))
            except ValueError as e:
                raise ValueError(f"{_SCALE_ENV}={given!r} is not a number; set e.g. "
                                 f"{_SCALE_ENV}=4 on a machine four times slower") from e
        else:
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", "import torch"], check=True, timeout=600,
                           capture_output=True)
            measured = (time.monotonic() - t0) / _REFERENCE_TORCH_IMPORT_S
            _scale = min(_MAX_SCALE, max(1.0, measured))
    return _scale


def scaled_timeout(seconds: float) -> float:
    """``seconds`` (a timeout that suffices on a quiet reference machine) times
    :func:`timeout_scale`: the subprocess timeouts of slow tests grow with the machine's load.

    Example:
        >>> subprocess.run(cmd, timeout=scaled_timeout(300))  # doctest: +SKIP
    """
    return seconds * timeout_scale()


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process of the test suite (torchrun, DeepSpeed tools).

    ``TORCH_EXTENSIONS_DIR`` defaults to ``torch_extensions`` inside the running virtual
    environment: DeepSpeed JIT-builds its CPU communication op there under a file lock, and a
    run killed while building leaves the lock behind, so in the user's shared
    ``~/.cache/torch_extensions`` it would make every later DeepSpeed process wait forever.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    return {**env, **(extra or {})}


def run_command(cmd: Sequence[str], *, what: str, timeout: float,
                env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``cmd`` (environment: :func:`subprocess_env` plus ``env``); returns its result.

    Raises:
        AssertionError: it timed out or failed; the message holds the ends of its stdout and
            stderr (a hang's cause is usually on stderr).
    """
    # its own process group: on a timeout the whole tree goes (torchrun's ranks would outlive it)
    with subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=subprocess_env(env), start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            raise AssertionError(f"{what} timed out after {timeout:.0f}s: {' '.join(cmd)}\n"
                                 f"--- stdout ---\n{_text(out)[-3000:]}\n"
                                 f"--- stderr ---\n{_text(err)[-4000:]}") from None
    proc = subprocess.CompletedProcess(list(cmd), p.returncode, out, err)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-2000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def _text(out: bytes | str | None) -> str:
    """A TimeoutExpired's output: bytes even when the run asked for text."""
    if isinstance(out, bytes):
        return out.decode("utf-8", "replace")
    return out or ""
