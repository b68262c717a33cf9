"""``ucp diff A B``: two checkpoints compared parameter by parameter and state by state.

Both sides are opened through the resharder's read interface (:func:`ucp.resharder.open_array_source`),
so A and B may each be a universal checkpoint or any checkpoint ``ucp convert`` reads, in any
layout. Each state is equal (same dtype, same bits), close (within ``atol + rtol * |b|``
elementwise) or different (with its largest absolute and relative difference); names and states
on one side only are listed as missing (only in A) or extra (only in B). Arrays stream in bands
of rows (chunk-aligned for universal arrays), so memory holds a band of each side, except a
source converted on the fly, whose states are consolidated whole, one at a time.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from ucp.core._fingerprint import bit_view
from ucp.ops._inspect import SCHEMA_VERSION, display_url

__all__ = ["DiffReport", "StateDiff", "diff_checkpoints"]

#: Elements of one side read per band (about 64 MiB once widened to float64 for the maths).
BAND = 8 * 2**20
#: Statuses that count as "the same within tolerance".
SAME = ("equal", "close")


@dataclasses.dataclass(frozen=True)
class StateDiff:
    """One parameter state (``state`` is ``"buffer"`` for a buffer) compared.

    ``status``: equal, close, different, shape (shapes differ), missing (only in A) or extra
    (only in B). ``max_abs``/``max_rel`` are None when nothing was compared.
    """

    name: str
    state: str
    status: str
    max_abs: float | None = None
    max_rel: float | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "state": self.state, "status": self.status,
                "max_abs": _json_float(self.max_abs), "max_rel": _json_float(self.max_rel),
                "detail": self.detail}

    def __str__(self) -> str:
        text = f"{self.status:9s} {self.name} [{self.state}]"
        if self.max_abs is not None and self.status != "equal":
            text += f"  max abs {self.max_abs:.3g}  max rel {self.max_rel:.3g}"
        return f"{text}  {self.detail}".rstrip()


@dataclasses.dataclass
class DiffReport:
    """What :func:`diff_checkpoints` found (``to_dict()`` is ``ucp diff --json``)."""

    a: str
    b: str
    atol: float
    rtol: float
    entries: list[StateDiff] = dataclasses.field(default_factory=list)

    @property
    def equal(self) -> bool:
        """Every state on both sides, each equal or close."""
        return all(e.status in SAME for e in self.entries)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("equal", "close", "different", "shape", "missing", "extra"), 0)
        for e in self.entries:
            out[e.status] += 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "ucp.diff", "schema_version": SCHEMA_VERSION, "a": display_url(self.a),
                "b": display_url(self.b), "atol": self.atol, "rtol": self.rtol, "equal": self.equal,
                "counts": self.counts(), "entries": [e.to_dict() for e in self.entries]}


def _json_float(v: float | None) -> float | str | None:
    return v if v is None or math.isfinite(v) else str(v)


def diff_checkpoints(a: Any, b: Any, *, states: Sequence[str] | None = None, atol: float = 0.0,
                     rtol: float = 0.0, engine_a: str = "auto", engine_b: str = "auto",
                     spec: Any = None, tag_a: str | None = None, tag_b: str | None = None,
                     storage_options: Mapping[str, Any] | None = None,
                     progress: bool | None = None) -> DiffReport:
    """Compares checkpoints ``a`` and ``b`` state by state.

    Args:
        a, b: URLs (or opened sources) of a universal checkpoint or anything ``ucp convert`` reads.
        states: only these states (``param``, ``fp32``, ``exp_avg``, ..., ``buffer``); default all.
        atol, rtol: a state is close when ``|a - b| <= atol + rtol * |b|`` everywhere (NaN
            matches NaN).
        engine_a, engine_b, tag_a, tag_b: how to open each side (as ``ucp convert``).
        spec: UCL spec for sources whose TP/PP layout needs one (both sides).
        storage_options: fsspec options for both URLs.
        progress: a progress bar on stderr (default: when stderr is a terminal).

    Returns:
        A :class:`DiffReport`; ``.equal`` is True when every state matches within tolerance.

    Example:
        >>> report = diff_checkpoints("ds_ckpt/", "universal/", rtol=1e-6)
        >>> [str(e) for e in report.entries if e.status not in ("equal", "close")]
    """
    from ucp.resharder import open_array_source

    sa = open_array_source(a, engine=engine_a, spec=spec, tag=tag_a, storage_options=storage_options)
    sb = open_array_source(b, engine=engine_b, spec=spec, tag=tag_b, storage_options=storage_options)
    report = DiffReport(str(a), str(b), float(atol), float(rtol))
    keys = _keys(sa, sb, states, report)
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    for name, state in tqdm(keys, desc="diff", unit="state", file=sys.stderr, disable=not show,
                            leave=False):
        report.entries.append(_compare(sa, sb, name, state, atol=atol, rtol=rtol))
    return report


def _has(states: Sequence[str], state: str) -> bool:
    """Whether a read of ``state`` works: ``param`` of an fp32 model is read from its ``fp32``."""
    return state in states or (state == "param" and "fp32" in states)


def _keys(sa: Any, sb: Any, states: Sequence[str] | None,
          report: DiffReport) -> list[tuple[str, str | None]]:
    """The (name, state) pairs on both sides, in A's order; the others go to the report."""
    wanted = None if states is None else set(states)
    keys: list[tuple[str, str | None]] = []

    def visit(table_a: dict[str, list[str]], table_b: dict[str, list[str]]) -> None:
        for name, have_a in table_a.items():
            for st in have_a:
                if wanted is not None and st not in wanted:
                    continue
                if _has(table_b.get(name, []), st):
                    keys.append((name, None if st == "buffer" else st))
                else:
                    report.entries.append(StateDiff(name, st, "missing", detail="only in A"))
        for name, have_b in table_b.items():
            for st in have_b:
                if (wanted is None or st in wanted) and not _has(table_a.get(name, []), st):
                    report.entries.append(StateDiff(name, st, "extra", detail="only in B"))

    visit({n: list(sa.info(n).states) for n in sa.names()}, {n: list(sb.info(n).states) for n in sb.names()})
    visit({n: ["buffer"] for n in sa.buffer_names()}, {n: ["buffer"] for n in sb.buffer_names()})
    return keys


def _compare(sa: Any, sb: Any, name: str, state: str | None, *, atol: float, rtol: float) -> StateDiff:
    label = state or "buffer"
    ia, ib = sa.array(name, state), sb.array(name, state)
    acc = _Acc()
    shape_a = shape_b = None
    for xa, xb in _bands(sa, sb, name, state, ia, ib):
        if tuple(xa.shape) != tuple(xb.shape):
            shape_a, shape_b = list(xa.shape), list(xb.shape)
            break
        acc.add(xa, xb, atol=atol, rtol=rtol)
    if shape_a is not None:
        return StateDiff(name, label, "shape", detail=f"shape {shape_a} in A, {shape_b} in B")
    detail = "" if acc.dtypes[0] == acc.dtypes[1] else f"dtype {acc.dtypes[0]} in A, {acc.dtypes[1]} in B"
    status = "equal" if acc.bitwise and not detail else "close" if acc.close else "different"
    return StateDiff(name, label, status, acc.max_abs, acc.max_rel, detail)


def _bands(sa: Any, sb: Any, name: str, state: str | None, ia: Any,
           ib: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Both sides' values in matching bands of rows (whole, when a side cannot read by region
    or the shapes are unknown or differ)."""
    shape = ia.shape
    if not shape or shape != ib.shape or ia.chunks is None and ib.chunks is None:
        yield sa.read(name, state, None), sb.read(name, state, None)
        return
    whole = [None if i.chunks is not None else s.read(name, state, None) for i, s in ((ia, sa), (ib, sb))]
    row = math.prod(shape[1:]) or 1
    unit = max((i.chunks[0] for i in (ia, ib) if i.chunks is not None), default=1)
    rows = max(unit, BAND // row // unit * unit)
    for lo in range(0, shape[0], rows) if shape[0] else [0]:
        region = ((lo, min(shape[0], lo + rows)), *((0, n) for n in shape[1:]))
        yield tuple(w[lo:region[0][1]] if w is not None else s.read(name, state, region)  # type: ignore[misc]
                    for w, s in zip(whole, (sa, sb)))


class _Acc:
    """Running comparison of bands: bitwise equality, max differences, within tolerance."""

    def __init__(self) -> None:
        self.bitwise, self.close = True, True
        self.max_abs, self.max_rel = 0.0, 0.0
        self.dtypes: tuple[Any, Any] = (None, None)

    def add(self, xa: torch.Tensor, xb: torch.Tensor, *, atol: float, rtol: float) -> None:
        self.dtypes = (str(xa.dtype).removeprefix("torch."), str(xb.dtype).removeprefix("torch."))
        if xa.numel() == 0:
            return
        same = xa.dtype == xb.dtype and bool(np.array_equal(bit_view(xa), bit_view(xb)))
        self.bitwise &= same
        if same:
            return
        fa, fb = xa.double(), xb.double()
        same_value = (fa == fb) | (fa.isnan() & fb.isnan())  # inf == inf; NaN matches NaN
        d = (fa - fb).abs().masked_fill_(same_value, 0.0).nan_to_num_(nan=math.inf)
        rel = (d / fb.abs()).masked_fill_(d == 0, 0.0).nan_to_num_(nan=math.inf)
        self.max_abs = max(self.max_abs, float(d.max()))
        self.max_rel = max(self.max_rel, float(rel.max()))
        self.close &= bool((d <= atol + rtol * fb.abs().nan_to_num_(nan=0.0)).all())
