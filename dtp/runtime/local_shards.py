"""Plain local tensors declared as shards, on uneven sizes: their global shape from every rank's local size.

torch takes a plain tensor declared `Shard(d)` as an even shard (global size = local size x tp): on an
uneven sequence (5 over 3 ranks: 2, 2, 1) the ranks then disagree on the global shape and the next
all-gather / reduce-scatter aborts in gloo (`Received data size doesn't match expected size`).  dtp asks
the ranks instead.  A torch.chunk split is exact; any other split is a LocalShardError (a ValueError)
naming the module, every rank's sizes and the fix, on every rank (they all read the same gathered sizes).

- Where a plain shard meets an all-gather of its own (`Speculation.gather`: SP's fused Shard -> Replicate,
  a column layer's sequence-sharded input), the sizes ride in that all-gather: each rank sends its length in
  a 16-byte header and its data padded to the widest shard of the last call at this site (a width every
  rank knows, so the buffers agree).  A site's first call, or a longer shard than that width, costs one more
  all-gather; the steady state costs a copy of the shard and no collective.
- Elsewhere (`plain_global_shape`: a redistribute through DTensor, ids, logits) one all-gather of 9 ints.
- A SequenceParallel module on a plain shard makes no collective: its output DTensor's shape is torch's even
  guess, marked as a guess (`guessed_spec`), and the dtp collective that reads it learns the true sizes.

No rank may skip on its own: whether its local size "changed" is a per-rank fact (5 over 3 after 6 over 3:
ranks 0 and 1 still hold 2), so a per-rank cache would leave some ranks in a collective the others never
join; every decision here depends only on what all ranks gathered.  A DTensor (`use_local_output=False`
upstream) carries its global shape and needs none of this.  On a GPU, reading the sizes is a host sync.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Placement, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from dtp.runtime.collectives import AxisGroup, _all_gather_single, all_gather, axis_of, chunk_sizes
from dtp.runtime.sharding import contiguous_stride
from dtp.runtime.traced import is_compiling

__all__ = ["LocalShardError", "Speculation", "speculation", "plain_global_shape", "local_shapes", "guessed_spec",
           "is_guessed"]

_SLOTS = 8  # shape entries exchanged (more for a tensor of more dims): every rank sends the same count
_HEADER = 16  # bytes before a rank's data in a speculative all-gather: its length (int64), aligned for any dtype
_SITES: dict = {}  # (where, dim) -> Speculation: the sizes last seen at a collective site (the same on every rank)
_GUESSED: dict = {}  # id(spec) -> spec: specs whose global shape is torch's even guess from a plain shard


class LocalShardError(ValueError):
    """Plain local shards whose sizes no DTensor can describe (not torch.chunk's split, or other dims differ)."""


def _fix(dim: int, tp: int) -> str:
    return (f"pass a DTensor, which carries its global shape (use_local_output=False on the style that produced "
            f"this tensor), or split dim {dim} as torch.chunk does (a length divisible by tp={tp} is split evenly)")


def checked_sizes(sizes: tuple, dim: int, where: str) -> tuple:
    """sizes, if they are torch.chunk's split of their sum; else LocalShardError (the same on every rank)."""
    total, tp = sum(sizes), len(sizes)
    if sizes != chunk_sizes(total, tp):
        raise LocalShardError(
            f"{where}: plain local shards (a tensor declared Shard({dim}) without its global shape) hold "
            f"{', '.join(map(str, sizes))} along dim {dim} on ranks 0..{tp - 1}, which is not torch.chunk's split "
            f"of {total} over {tp} ranks ({', '.join(map(str, chunk_sizes(total, tp)))}), so no global shape "
            f"describes them; fix: {_fix(dim, tp)}")
    return sizes


def local_shapes(local: torch.Tensor, axis: AxisGroup) -> list[tuple[int, ...]]:
    """Every rank's local shape, in rank order (one all-gather of 1 + max(8, ndim) int64s on the axis)."""
    slots = max(_SLOTS, local.dim())
    mine = torch.tensor([local.dim(), *local.shape] + [-1] * (slots - local.dim()), dtype=torch.int64,
                        device=local.device)
    rows = all_gather(mine, 0, (slots + 1,) * axis.size, axis).wait().view(axis.size, slots + 1).tolist()
    return [tuple(row[1:1 + row[0]]) for row in rows]


def _exchanged_sizes(local: torch.Tensor, dim: int, axis: AxisGroup, where: str) -> tuple:
    shapes = local_shapes(local, axis)
    if len({s[:dim] + s[dim + 1:] if len(s) == local.dim() else s for s in shapes}) > 1 or \
            any(len(s) != local.dim() for s in shapes):
        raise LocalShardError(f"{where}: plain local shards declared Shard({dim}) have local shapes "
                              f"{', '.join(map(str, shapes))} on ranks 0..{axis.size - 1}: they must agree "
                              f"outside dim {dim}")
    return checked_sizes(tuple(s[dim] for s in shapes), dim, where)


def plain_global_shape(local: torch.Tensor, mesh: DeviceMesh, placement: Placement, where: str) -> tuple[int, ...]:
    """The global shape of this rank's plain `placement` shard: 9 ints all-gathered (an even guess if compiling)."""
    shape = list(local.shape)
    if not isinstance(placement, Shard) or local.dim() == 0:
        return tuple(shape)
    dim, tp = placement.dim % local.dim(), mesh.size()
    if tp == 1 or is_compiling() or local.device.type == "meta":
        shape[dim] *= tp
        return tuple(shape)
    shape[dim] = sum(_exchanged_sizes(local, dim, axis_of(mesh), where))
    return tuple(shape)


def _speculative_all_gather(t: torch.Tensor, dim: int, axis: AxisGroup, width: int):
    """(t gathered along dim, or None if a shard is wider than `width`; every rank's length): one all-gather."""
    shape = list(t.shape)
    shape[dim] = width
    data_bytes = torch.Size(shape).numel() * t.element_size()
    row = _HEADER + -(-data_bytes // _HEADER) * _HEADER
    send = torch.empty(row, dtype=torch.uint8, device=t.device)
    send[:8].view(torch.int64).fill_(t.shape[dim])
    keep = min(width, t.shape[dim])
    send[_HEADER:_HEADER + data_bytes].view(t.dtype).view(shape).narrow(dim, 0, keep).copy_(t.narrow(dim, 0, keep))
    rows = torch.empty(axis.size * row, dtype=torch.uint8, device=t.device)
    _all_gather_single(rows, send, group=axis.group)
    rows = rows.view(axis.size, row)
    sizes = tuple(rows[:, :8].view(torch.int64).view(-1).tolist())
    if max(sizes) > width:
        return None, sizes
    data = rows[:, _HEADER:_HEADER + data_bytes].view(t.dtype).view([axis.size] + shape)
    return torch.cat([data[r].narrow(dim, 0, n) for r, n in enumerate(sizes)], dim=dim), sizes


class Speculation:
    """One collective site's last sizes (the same on every rank): the width its next all-gather pads to."""

    __slots__ = ("where", "sizes")

    def __init__(self, where: str):
        self.where, self.sizes = where, None

    def gather(self, t: torch.Tensor, dim: int, axis: AxisGroup):
        """(t's shards of every rank concatenated along dim, every rank's length): exact for torch.chunk splits."""
        dim = dim % t.dim()
        if axis.size == 1:
            return t, (t.shape[dim],)
        speculate = self.sizes is not None and not (t.is_complex() or t.dtype == torch.bool)
        out, sizes = _speculative_all_gather(t, dim, axis, max(self.sizes)) if speculate else (None, None)
        if sizes is None:
            sizes = _exchanged_sizes(t, dim, axis, self.where)
        self.sizes = checked_sizes(sizes, dim, self.where)
        if out is None:
            out = all_gather(t, dim, sizes, axis).wait()
        return out, sizes


def speculation(where: str, dim: int) -> Speculation:
    """The Speculation of a collective site (a module's name and the gathered dim)."""
    site = _SITES.get((where, dim))
    if site is None:
        if len(_SITES) > 4096:  # every rank sees the same sites in the same order: they clear alike
            _SITES.clear()
        site = _SITES[(where, dim)] = Speculation(where)
    return site


def guessed_spec(mesh: DeviceMesh, placement: Placement, shape, dtype) -> DTensorSpec:
    """The spec of a DTensor whose global shape is torch's even guess from a plain shard (cached, marked)."""
    shape = torch.Size(shape)
    key = ("guessed", id(mesh), placement, shape, dtype)
    hit = _GUESSED.get(key)
    if hit is not None and hit.mesh is mesh:
        return hit
    if len(_GUESSED) > 4096:
        _GUESSED.clear()
    spec = DTensorSpec(mesh, (placement,), TensorMeta(shape, contiguous_stride(shape), dtype))
    _GUESSED[key] = _GUESSED[id(spec)] = spec
    return spec


def is_guessed(x) -> bool:
    """x is a DTensor whose global shape is a guess (made by guessed_spec)."""
    spec = getattr(x, "_spec", None)
    return spec is not None and _GUESSED.get(id(spec)) is spec
