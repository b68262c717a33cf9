"""``ucp convert``: any supported distributed checkpoint -> one universal checkpoint.

Parameters stream one at a time (memory: the largest parameter's states plus fixed buffers),
in parallel over worker processes, and over the ranks of a ``torchrun`` job (each rank takes a
share of the parameters; rank 0 commits). The universal checkpoint is committed by writing its
group metadata last, so an interrupted conversion never looks complete.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ucp.core._tree import jsonable
from ucp.ops._beside import Beside
from ucp.core._coord import get_coordinator
from ucp.ops._dest import check_destination
from ucp.core._errors import ConvertError, VerificationError
from ucp.core._fingerprint import ALGORITHM, fingerprint, to_hex
from ucp.universal._checkpoint import UniversalCheckpoint, UniversalWriter, escape_name, open_universal
from ucp.engines._base import SourceCheckpoint
from ucp.engines._open import layout_spec, open_source, spec_of

__all__ = ["convert"]

log = logging.getLogger("ucp")


def convert(src: str, dst: str, *, engine: str = "auto", spec: Any = None, workers: int = 1,
            tag: str | None = None, overwrite: bool = False, verify: bool = True,
            storage_options: Mapping[str, Any] | None = None,
            dst_storage_options: Mapping[str, Any] | None = None,
            progress: bool | None = None) -> UniversalCheckpoint:
    """Converts the distributed checkpoint at ``src`` into a universal checkpoint at ``dst``.

    Called by one process, or by every rank of a torchrun job (each converts a share).

    Args:
        src: the source checkpoint (local path or fsspec URL).
        dst: where the universal checkpoint goes (local path or fsspec URL).
        engine: engine plugin name, or ``"auto"`` to detect it.
        spec: a UCL spec (``Spec``, bundled spec name, path or text) for layouts the data cannot
            tell (TP/PP); its text and constant overrides are stored in the universal checkpoint.
        workers: processes converting in parallel on this machine.
        tag: which step/tag of the source (default: the newest).
        overwrite: replace a complete universal checkpoint at ``dst``.
        verify: fingerprint every state as the source gives it and as written, fail on the
            first that differs, and record the fingerprints (:mod:`ucp.core._fingerprint`) so that
            ``reshard``, ``export``, ``diff`` and ``verify --deep`` can check against them.
        storage_options / dst_storage_options: fsspec options for ``src`` / ``dst``.
        progress: show a progress bar on stderr (default: when stderr is a terminal).

    Returns:
        The written checkpoint, opened.

    Raises:
        ConvertError: the source cannot be read or does not fit the spec (names file/parameter).
        CheckpointExistsError: ``dst`` holds a complete checkpoint and ``overwrite`` is False.
        VerificationError: a state as written differs from the source's (names it).

    Example:
        >>> ckpt = ucp.convert("ds_ckpt/", "universal/", engine="deepspeed")
        >>> ckpt.read("wte.weight", state="exp_avg")
    """
    check_destination(src, dst)
    spec = spec_of(spec)
    source, found = open_source(src, engine=engine, spec=spec, tag=tag, storage_options=storage_options)
    log.info("found %s", found)
    names = source.names()
    _check_names(names)
    coord = get_coordinator(600.0)
    beside = _prepare(dst, overwrite=overwrite, storage_options=dst_storage_options) \
        if coord.rank == 0 else None
    build = coord.broadcast_json(beside and beside.url, what="starting conversion")
    try:
        _build(source, names, build, coord=coord, src=src, spec=spec, tag=tag,
               storage_options=storage_options, dst_storage_options=dst_storage_options,
               workers=workers, verify=verify,
               progress=sys.stderr.isatty() if progress is None else progress)
        if beside is not None:
            beside.publish()
    except BaseException:
        if beside is not None:
            beside.abandon()
        raise
    coord.all_gather_json(None, what="committing the universal checkpoint")
    return open_universal(dst, storage_options=dst_storage_options)


def _prepare(dst: str, *, overwrite: bool, storage_options: Mapping[str, Any] | None) -> Beside:
    """Coordinator only: checks ``dst`` may be replaced and starts the output beside it."""
    UniversalWriter(dst, storage_options=storage_options).check_destination(overwrite=overwrite)
    beside = Beside(dst, storage_options=storage_options)
    UniversalWriter(beside.url, storage_options=storage_options).begin(overwrite=True)
    return beside


def _build(source: SourceCheckpoint, names: list[str], build: str, *, coord: Any, src: str,
           spec: Any, tag: str | None, storage_options: Mapping[str, Any] | None,
           dst_storage_options: Mapping[str, Any] | None, workers: int, verify: bool,
           progress: bool) -> None:
    """Every rank converts its share of ``names`` into ``build``; rank 0 commits the table."""
    writer = UniversalWriter(build, storage_options=dst_storage_options)
    share = names[coord.rank::coord.world_size]
    job = dict(engine=source.engine, src=src, spec=spec, tag=tag, storage_options=storage_options,
               dst=build, dst_storage_options=dst_storage_options, verify=verify)
    entries = _convert_params(job, source, share, workers=workers, progress=progress)
    if coord.rank != 0:  # on another machine: its arrays durable before rank 0 commits
        writer.finish()
    gathered = coord.all_gather_json(entries, what="gathering converted parameters")
    if coord.rank != 0:
        return
    table = {k: v for part in gathered for k, v in part.items()}
    buffers = {n: {"path": f"buffers/{escape_name(n)}",
                   **_write_checked(writer, f"buffers/{escape_name(n)}", t, n, None, verify)}
               for n, t in source.buffers().items()}
    # A spec of constants only (torchtitan's head_dim) told the reader something but lays nothing
    # out: stored as the layout spec, verify and reshard would find every parameter uncovered.
    layout = layout_spec(spec)
    hint = spec is not None and layout is None
    writer.commit({
        "step": source.step,
        "source": {"engine": source.engine, "url": src,
                   "topology": None if source.topology is None else str(source.topology),
                   **({"constants": dict(spec.constants)} if hint else {})},
        "spec": None if layout is None else layout.text,
        "spec_constants": None if layout is None else dict(layout.overrides),
        "param_groups": jsonable(source.param_groups()),
        "params": {n: table[n] for n in names},
        "buffers": buffers,
        "aliases": dict(getattr(source, "aliases", dict)()),
        **({"extras": extras} if (extras := jsonable(getattr(source, "extras", dict)())) else {}),
        **({"fingerprint_algorithm": ALGORITHM} if verify else {}),
    })


def _check_names(names: Iterable[str]) -> None:
    """Refuses two parameters whose stored names are equal, or equal but for case: on a
    case-insensitive filesystem (macOS, Windows, SMB shares) they would share one directory."""
    seen: dict[str, str] = {}
    for n in names:
        e = escape_name(n)
        other = seen.get(e.lower())
        if other is not None:
            how = "the same stored name" if escape_name(other) == e else \
                "stored names that differ only in case (one directory on case-insensitive filesystems)"
            raise ConvertError(f"parameters {other!r} and {n!r} map to {how} {e!r}; rename one of "
                               "them in the model before saving")
        seen[e.lower()] = n


def convert_one(source: SourceCheckpoint, writer: UniversalWriter, name: str, *,
                verify: bool = False) -> dict[str, Any]:
    """Writes every state of one parameter; returns its table entry."""
    return dict(convert_stream(source, writer, [name], verify=verify))[name]


def _write_checked(writer: UniversalWriter, path: str, t: torch.Tensor, name: str, state: str | None,
                   verify: bool, want: int | None = None) -> dict[str, Any]:
    """``writer.write``; with ``verify``, the written array's fingerprint must equal ``want``
    (the source's; default: ``t``'s)."""
    written = writer.write(path, t, fingerprint=verify)
    if verify:
        _check_written(writer, path, written, name, state, fingerprint(t) if want is None else want)
    return written


def _check_written(writer: UniversalWriter, path: str, written: Mapping[str, Any], name: str,
                   state: str | None, want: int) -> None:
    """The written array's fingerprint must equal ``want`` (the source's)."""
    want_hex = to_hex(want)
    if written["fingerprint"] != want_hex:
        what = f"state {state!r}" if state is not None else "buffer"
        raise VerificationError(
            f"{name}: {what} as written to {writer.url}/{path} differs from the source (fingerprint "
            f"{written['fingerprint']}, the source's {want_hex}): the conversion changed its values "
            "or their order; do not use this output, and report the bug with `ucp diff SRC DST`")


#: States read ahead of the one being written (reading overlaps writing).
READ_AHEAD = 1


def convert_stream(source: SourceCheckpoint, writer: UniversalWriter, names: Sequence[str], *,
                   verify: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """Writes every state of every parameter in ``names``; yields ``(name, table entry)`` as
    each parameter is done. A reader thread reads the next state while this one writes the
    current (memory: at most ``READ_AHEAD + 2`` states alive); with ``verify``, the reader
    takes each state's fingerprint from the source's records (native fragments, universal
    arrays) or computes it from the values read, and the writer checks the array it wrote
    against that."""
    items: queue.Queue[Any] = queue.Queue(maxsize=READ_AHEAD)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    recorded = getattr(source, "recorded_fingerprint", None) if verify else None

    def source_print(name: str, state: str, t: torch.Tensor) -> int | None:
        """The source's fingerprint of a state: the one it recorded when written (its fragments'
        at save, a universal array's at conversion), else computed from the values read."""
        if not verify:
            return None
        value = recorded(name, state) if recorded is not None else None
        return fingerprint(t) if value is None else value

    def read() -> None:
        try:
            for name in names:
                info = source.info(name)
                states = info.states
                if info.dtype == torch.float32 and "fp32" in states:  # an fp32 model's weights are stored once
                    states = tuple(s for s in states if s != "param")
                for state in states:
                    t = source.read(name, state)
                    if state != "step" and tuple(t.shape) != tuple(info.shape):
                        raise ConvertError(f"{name}: state {state!r} has shape {list(t.shape)}, but the "
                                           f"parameter's shape is {list(info.shape)}")
                    if not put((name, info, state, t, source_print(name, state, t))):
                        return
                    del t
                if not put((name, info, None, states, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the writing thread
            put(e)

    if not names:
        return
    thread = threading.Thread(target=read, name="ucp-convert-read", daemon=True)
    thread.start()
    # Parameters written whose row fingerprints may still run (they lag the writes; the writer's
    # row buffers bound how far): each is checked, and yielded, once its arrays' fingerprints are
    # done, in order; waited for only at the end.
    pending: collections.deque[tuple[str, Any, tuple[str, ...], list[tuple[str, Any, int | None]]]] = \
        collections.deque()
    arrays: list[tuple[str, Any, int | None]] = []

    def finished(wait: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        while pending and (wait or all(w.done() for _, w, _ in pending[0][3])):
            name, info, states, written = pending.popleft()
            nbytes, crcs, fps = 0, {}, {}
            for state, later, want in written:
                entry = later.result()
                path = f"params/{escape_name(name)}/{state}"
                if verify:
                    assert want is not None
                    _check_written(writer, path, entry, name, state, want)
                    fps[state] = entry["fingerprint"]
                nbytes += entry["nbytes"]
                crcs[state] = entry["meta_crc32c"]
            yield name, {"path": f"params/{escape_name(name)}", "shape": list(info.shape),
                         "dtype": str(info.dtype).removeprefix("torch."), "states": list(states),
                         "frozen": info.frozen, "group": info.group, "nbytes": nbytes,
                         "meta_crc32c": crcs, **({"fingerprints": fps} if verify else {})}

    try:
        done = 0
        while done < len(names):
            item = items.get()
            if isinstance(item, BaseException):
                raise item
            name, info, state, t, want = item
            if state is None:  # every state of ``name`` is written
                done += 1
                pending.append((name, info, tuple(t), arrays))
                arrays = []
                yield from finished(wait=False)
                continue
            later = writer.write_later(f"params/{escape_name(name)}/{state}", t, fingerprint=verify)
            arrays.append((state, later, want))
            del t, item
        yield from finished(wait=True)
    finally:
        stop.set()
        thread.join()


def _convert_params(job: dict[str, Any], source: SourceCheckpoint, names: list[str], *, workers: int,
                    progress: bool) -> dict[str, Any]:
    from tqdm import tqdm

    bar = tqdm(total=len(names), unit="param", desc="convert", file=sys.stderr, disable=not progress)
    out: dict[str, Any] = {}
    try:
        if workers <= 1 or len(names) <= 1:
            writer = UniversalWriter(job["dst"], storage_options=job["dst_storage_options"])
            for name, entry in convert_stream(source, writer, names, verify=job["verify"]):
                out[name] = entry
                bar.update(1)
            return out
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                    initargs=(dict(job), os.getpid())) as pool:
            futures = {pool.submit(_worker_convert, n): n for n in names}
            for fut in cf.as_completed(futures):
                out[futures[fut]] = fut.result()
                bar.update(1)
        return out
    finally:
        bar.close()


_W: dict[str, Any] = {}


def _worker_init(job: dict[str, Any], parent: int) -> None:
    _exit_with_parent(parent)
    torch.set_num_threads(1)
    source, _ = open_source(job["src"], engine=job["engine"], spec=job["spec"], tag=job["tag"],
                            storage_options=job["storage_options"])
    _W["source"] = source
    _W["writer"] = UniversalWriter(job["dst"], storage_options=job["dst_storage_options"])
    _W["verify"] = job["verify"]


def _exit_with_parent(parent: int) -> None:
    """Ends this worker process when ``parent`` is gone (killed, say): an orphaned worker
    would wait for work forever, holding the parent's stdout and its memory."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="ucp-parent-watch", daemon=True).start()


def _worker_convert(name: str) -> dict[str, Any]:
    return convert_one(_W["source"], _W["writer"], name, verify=_W["verify"])
