"""ucp's native layout as a reshard target: a universal (or any) checkpoint laid out as the per-rank
files ``ucp.save`` writes, for any topology, committed with a manifest."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Mapping

from ucp.core._coord import get_coordinator
from ucp.core._errors import CheckpointExistsError, UcpError
from ucp.core._stfile import dtype_name
from ucp.core._topology import Topology
from ucp.core._tree import flatten
from ucp.grammar import Spec
from ucp.native._layout import MANIFEST
from ucp.native._meta import FileRecord, TensorFragment, step_dir
from ucp.native._save import write_manifest, write_rank_files
from ucp.resharder import ArraySource, ReadStats, ReshardReport, build_state, plan_ranks, read_plan
from ucp.resharder._fingerprints import OutputFingerprints, check_output
from ucp.storage import Storage

__all__ = ["NativeTarget", "spec_text"]

log = logging.getLogger("ucp")


class NativeTarget:
    """ucp's native per-rank format (what ``ucp.save`` writes), for any topology.

    Called by one process, or by every process of a torchrun job: target ranks are shared out
    round-robin, and process 0 commits the step once every process wrote its ranks.
    """

    name = "ucp"
    default_alignment = 1

    def write(self, source: ArraySource, dst: str, *, topology: Topology, spec: Spec | None,
              alignment: int, step: int, overwrite: bool,
              storage_options: Mapping[str, Any] | None, workers: int,
              progress: bool, verify: bool = False) -> ReshardReport:
        """``verify``: every state the ranks hold, summed box by box over all ranks, must have
        its source's fingerprint before the step is committed (:mod:`._fingerprints`)."""
        start = time.perf_counter()
        plans = plan_ranks(source, topology, spec=spec, alignment=alignment)  # checks before I/O
        storage = Storage(dst, storage_options=storage_options)
        coord = get_coordinator(600.0)
        manifest = f"{step_dir(step)}/{MANIFEST}"
        if storage.exists(manifest):
            if not overwrite:
                raise CheckpointExistsError(f"step {step} is already committed under {dst}; pass "
                                            "overwrite=True (--overwrite) to replace it")
            if coord.rank == 0:
                storage.delete(manifest)  # uncommitted while its files are replaced
        coord.all_gather_json(None, what="starting to reshard")
        mine = tuple(range(coord.rank, topology.world_size, coord.world_size))
        files, stats = {}, ReadStats()
        prints = OutputFingerprints() if verify else None
        from tqdm import tqdm

        for rank in tqdm(mine, desc="reshard", unit="rank", file=sys.stderr, disable=not progress):
            loaded = read_plan(plans[rank], source, workers=workers)
            if prints is not None:
                prints.add(loaded)
            files.update(_write_rank(storage, build_state(loaded, step=step), step=step,
                                     rank=rank, world_size=topology.world_size))
            stats = stats + loaded.stats
        gathered = coord.all_gather_json(files, what="gathering resharded ranks")
        if prints is not None:  # every process checks the same sums: all raise, none commits
            check_output(source, coord.all_gather_json(prints.to_json(), what="gathering fingerprints"), dst)
        if coord.rank == 0:
            records = {k: FileRecord.from_dict(v) for part in gathered for k, v in part.items()}
            write_manifest(storage, step=step, world_size=topology.world_size, topology=topology,
                           spec=None if spec is None else spec_text(spec), files=records)
        coord.all_gather_json(None, what="committing the resharded checkpoint")
        return ReshardReport(dst, self.name, topology, step, mine, stats, time.perf_counter() - start)


def _write_rank(storage: Storage, state: Any, *, step: int, rank: int, world_size: int
                ) -> dict[str, dict[str, int]]:
    tree, tensors = flatten(state)
    staged = {key: t.contiguous() for key, (_path, t) in tensors.items()}
    fragments = [TensorFragment(key=k, dtype=dtype_name(t.dtype), shape=tuple(t.shape),
                                global_shape=tuple(t.shape), offsets=(0,) * t.dim())
                 for k, t in staged.items()]
    return write_rank_files(storage, step=step, rank=rank, world_size=world_size, tree=tree,
                            staged=staged, fragments=fragments, direct=True)


def spec_text(spec: Spec) -> str:
    """The spec's text with its constant overrides written in, so the manifest's spec alone
    reads the checkpoint back (``ucp convert`` uses it). Each overridden constant's line is
    replaced; the result is checked to resolve to the same constants, else the original text is
    kept (and ``--spec`` is then needed to convert)."""
    if not spec.overrides:
        return spec.text
    from ucp.grammar import load_spec
    from ucp.grammar._ast import Const

    lines = spec.text.split("\n")
    for st in spec.ast.statements:
        if isinstance(st, Const) and st.name in spec.overrides:
            lines[st.pos.line - 1] = f"{st.name} = {int(spec.overrides[st.name])}"
    text = "\n".join(lines)
    try:
        if dict(load_spec(text).constants) == dict(spec.constants):
            return text
    except UcpError:
        pass
    log.warning("ucp: the spec's constant overrides could not be written into its text; the "
                "manifest keeps the original spec, so pass --spec to convert the checkpoint")
    return spec.text
