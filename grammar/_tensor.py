"""``cut`` and ``consolidate``: thin tensor operations on top of a :class:`ParamLayout`.

Both are bit-exact (slicing and copying only; an ``average`` of copies that differ is the one
place where arithmetic happens) and work for any dtype, bfloat16 included, and for every state of
a parameter alike: weights, master weights and optimizer moments share the layout.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ucp.core._errors import UcpSpecError

from ._layout import ParamLayout, Piece, inverse

__all__ = ["cut_tensor", "consolidate_tensors"]


def _slices(region: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in region)



def cut_tensor(layout: ParamLayout, tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """The local tensor of ``rank``: its pieces of ``tensor``, zeros where it holds padding.

    Raises:
        UcpSpecError: when ``tensor`` does not have the layout's canonical shape, or ``rank``
            does not hold the parameter.
    """
    if tuple(tensor.shape) != layout.global_shape:
        raise UcpSpecError(f"cannot cut {layout.name!r}: the tensor has shape "
                           f"{list(tensor.shape)}, the layout was computed for "
                           f"{list(layout.global_shape)}")
    out = tensor.new_zeros(layout.local_shape(rank))
    for piece in layout.pieces(rank):
        out[_slices(piece.local_region)] = tensor[_slices(piece.global_region)].permute(layout.perm)
    return out


def consolidate_tensors(layout: ParamLayout, fragments: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """The canonical tensor rebuilt from the local tensors of the ranks in :meth:`~ParamLayout.needed`.

    Fragments of other ranks that hold the parameter are ignored (e.g. dp copies).

    Raises:
        UcpSpecError: on a missing or misshapen fragment, a fragment of a rank that does not hold
            the parameter, mixed dtypes, copies that a ``check`` policy finds unequal, or an
            ``average`` of unequal copies of a non-floating dtype.
    """
    needed = layout.needed()
    _validate(layout, fragments, needed)
    first = fragments[needed[0]]
    out = torch.empty(layout.global_shape, dtype=first.dtype, device=first.device)
    inv = inverse(layout.perm)
    for rank in layout.sources():
        for piece in layout.pieces(rank):
            out[_slices(piece.global_region)] = _block(fragments[rank], piece, inv)
    checked = tuple(a for a, p in layout.policies if p == "check")
    averaged = tuple(a for a, p in layout.policies if p == "average")
    for rank in layout.sources():
        if checked:
            _check(layout, fragments, rank, checked, out, inv)
        if averaged:
            _average(layout, fragments, rank, averaged, out, inv)
    return out


def _block(fragment: torch.Tensor, piece: Piece, inv: tuple[int, ...]) -> torch.Tensor:
    return fragment[_slices(piece.local_region)].permute(inv)


def _validate(layout: ParamLayout, fragments: Mapping[int, torch.Tensor],
              needed: tuple[int, ...]) -> None:
    missing = [r for r in needed if r not in fragments]
    if missing:
        raise UcpSpecError(f"cannot consolidate {layout.name!r}: it needs the fragments of ranks "
                           f"{list(needed)} on {layout.topology}, and ranks {missing} are missing "
                           f"({layout.rule})")
    dtypes = set()
    for rank, frag in fragments.items():
        if not layout.holds(rank):
            raise UcpSpecError(f"rank {rank} holds no fragment of {layout.name!r} on "
                               f"{layout.topology} ({layout.rule}); is the topology or the spec "
                               "the one the checkpoint was written with?")
        if rank in needed:
            expected = layout.local_shape(rank)
            if tuple(frag.shape) != expected:
                raise UcpSpecError(f"rank {rank}'s fragment of {layout.name!r} has shape "
                                   f"{list(frag.shape)}, the spec expects {list(expected)} "
                                   f"({layout.rule})")
            dtypes.add(frag.dtype)
    if len(dtypes) > 1:
        raise UcpSpecError(f"the fragments of {layout.name!r} mix dtypes {sorted(map(str, dtypes))}")


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _check(layout: ParamLayout, fragments: Mapping[int, torch.Tensor], source: int,
           axes: tuple[str, ...], out: torch.Tensor, inv: tuple[int, ...]) -> None:
    for rank in layout.replicas(source, axes):
        if rank == source:
            continue
        for piece in layout.pieces(rank):
            if not _same(_block(fragments[rank], piece, inv), out[_slices(piece.global_region)]):
                raise UcpSpecError(
                    f"the copies of {layout.name!r} on ranks {source} and {rank} differ, but the "
                    f"spec says they are equal (policy `check` over {', '.join(axes)}; "
                    f"{layout.rule}); if they may drift apart, write `average`, or `first` to "
                    "keep the first copy")


def _average(layout: ParamLayout, fragments: Mapping[int, torch.Tensor], source: int,
             axes: tuple[str, ...], out: torch.Tensor, inv: tuple[int, ...]) -> None:
    group = layout.replicas(source, axes)
    for piece in layout.pieces(source):
        region = _slices(piece.global_region)
        copies = [_block(fragments[r], piece, inv) for r in group]
        if all(_same(copies[0], c) for c in copies[1:]):
            continue  # equal copies: keep them bit for bit, no rounding
        if not copies[0].is_floating_point():
            raise UcpSpecError(f"cannot average the differing copies of {layout.name!r}: dtype "
                               f"{copies[0].dtype} is not floating point ({layout.rule})")
        total = torch.zeros(copies[0].shape, dtype=torch.float64, device=out.device)
        for c in copies:
            total += c.to(torch.float64)
        out[region] = (total / len(copies)).to(out.dtype)
