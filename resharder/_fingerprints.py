"""Checks a reshard's output against its source with layout-independent fingerprints.

Every box a target rank's plan copies out of a canonical array lands somewhere in one of the
rank's tensors (:class:`~._plan.Copy`): that destination, permuted back to canonical order, is
fingerprinted as the box of the canonical array it claims to be (:func:`ucp.core._fingerprint.
fingerprint_box`). Boxes held by several ranks (DP replicas, tied copies) count once; the boxes
of all ranks then tile each array, and their sum must equal the source array's fingerprint (the
one recorded in a universal checkpoint, else computed from the source while reading it).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ucp.core._errors import VerificationError
from ucp.core._fingerprint import MOD, combine, fingerprint, fingerprint_box, from_hex, to_hex

from ._read import LoadedRank
from ._source import ArraySource

__all__ = ["OutputFingerprints", "check_output", "check_recorded", "source_fingerprint"]

Key = tuple[str, str]


class OutputFingerprints:
    """Partial fingerprints of the boxes the ranks hold, keyed by the box (duplicates count once)."""

    def __init__(self) -> None:
        self.parts: dict[tuple[str, str, str], int] = {}

    def add(self, loaded: LoadedRank) -> None:
        """Fingerprints every box ``loaded`` holds of a parameter state (not buffers)."""
        for read in loaded.plan.reads:
            if read.state is None:
                continue
            t = loaded.tensors[read.path]
            if read.whole:
                self.parts.setdefault((read.name, read.state, "whole"), fingerprint(t))
                continue
            inverse = tuple(sorted(range(len(read.perm)), key=lambda i: read.perm[i]))
            flat = t.reshape(-1)
            for c in read.copies:
                key = (read.name, read.state, ",".join(f"{a}:{b}" for a, b in c.src))
                if key in self.parts:
                    continue
                view = flat[c.offset:c.offset + math.prod(c.view)].view(c.view)
                piece = view[tuple(slice(a, b) for a, b in c.dst)]
                piece = piece.permute(inverse) if inverse else piece
                self.parts[key] = fingerprint_box(piece, [a for a, _ in c.src], _shape_of(loaded, read.name))

    def to_json(self) -> list[list[str]]:
        return [[n, s, r, to_hex(v)] for (n, s, r), v in self.parts.items()]


def _shape_of(loaded: LoadedRank, name: str) -> tuple[int, ...]:
    return next(h.shape for h in loaded.plan.params if h.name == name)


def _merge(gathered: Iterable[list[list[str]]]) -> dict[Key, tuple[int, int | None]]:
    """Per (name, state): the sum of the distinct boxes' values and the elements they cover
    (None for a state copied whole)."""
    seen: dict[tuple[str, str, str], int] = {}
    for part in gathered:
        for n, s, r, v in part:
            seen.setdefault((n, s, r), from_hex(v))
    out: dict[Key, tuple[int, int | None]] = {}
    for (n, s, r), v in seen.items():
        total, covered = out.get((n, s), (0, 0))
        size = None if r == "whole" else math.prod(int(b) - int(a) for a, b in
                                                     (x.split(":") for x in r.split(",") if x))
        out[(n, s)] = ((total + v) % MOD, None if size is None or covered is None else covered + size)
    return out


def source_fingerprint(source: ArraySource, name: str, state: str) -> int:
    """The fingerprint of a source array: recorded (a universal checkpoint converted with
    verification), else computed, chunk by chunk where the source is chunked."""
    ckpt = getattr(source, "ckpt", None)
    recorded = ckpt.recorded_fingerprint(name, state) if ckpt is not None else None
    if recorded is not None:
        return recorded
    info = source.array(name, state)
    if info.shape is None or info.chunks is None or not info.shape:
        return fingerprint(source.read(name, state, None))
    region = tuple((0, n) for n in info.shape)
    return combine(fingerprint_box(t, [a for a, _ in sub], info.shape)
                   for sub, t in source.iter_region(name, state, region))


def check_output(source: ArraySource, gathered: Iterable[list[list[str]]], dst: str) -> None:
    """Raises :class:`VerificationError` for the first parameter state whose boxes, over all
    target ranks, do not add up to the source's fingerprint, or cover only part of it.

    Called by every process of the reshard with the same ``gathered`` parts (so all raise).
    """
    for (name, state), (value, covered) in sorted(_merge(gathered).items()):
        numel = math.prod(source.info(name).shape)
        if covered is not None and covered != numel:
            if covered < numel:
                raise VerificationError(f"{name}: state {state!r} as resharded to {dst} holds {covered} of "
                                        f"its {numel} elements on all ranks together; the plan lost part "
                                        "of it (a ucp bug: report it with the topology)")
            continue  # overlapping boxes: this layout cannot be summed box by box
        want = source_fingerprint(source, name, state)
        if value != want:
            raise _mismatch(name, state, dst, f"{to_hex(value)} over all ranks", want)


def check_recorded(source: ArraySource, name: str, state: str, t: torch.Tensor, dst: str) -> None:
    """Raises :class:`VerificationError` when ``t``, a whole state about to be written, does not
    have the fingerprint the universal ``source`` records for it (nothing recorded, or ``t`` in
    another dtype than the stored one: nothing to check)."""
    ckpt = getattr(source, "ckpt", None)
    want = ckpt.recorded_fingerprint(name, state) if ckpt is not None else None
    if want is None or source.array(name, state).dtype != t.dtype:
        return
    got = fingerprint(t)
    if got != want:
        raise _mismatch(name, state, dst, to_hex(got), want)


def _mismatch(name: str, state: str, dst: str, got: str, want: int) -> VerificationError:
    return VerificationError(
        f"{name}: state {state!r} as resharded to {dst} differs from the source (fingerprint {got}, "
        f"the source's {to_hex(want)}): values moved, changed or were dropped; do not use this "
        "output, and report the bug with the topology")
