"""Collectives on local shards over one mesh axis, with torch.chunk-style uneven shards.

They issue torch's functional collectives (the `_c10d_functional` ops that DTensor itself and
CommDebugMode use) directly on plain tensors, so the hot path pays for the communication and
nothing else.  Each returns a `Pending` handle: start the collective, do other work, then `.wait()`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

_c10d = torch.ops._c10d_functional

__all__ = ["AxisGroup", "chunk_sizes", "chunk_offset", "Pending",
           "all_reduce", "all_gather", "reduce_scatter"]


def chunk_sizes(size: int, world: int) -> tuple[int, ...]:
    """Shard sizes of a dim of `size` split over `world` ranks as torch.chunk / DTensor Shard do it."""
    full = -(-size // world)
    return tuple(max(0, min(full, size - r * full)) for r in range(world))


def chunk_offset(size: int, world: int, rank: int) -> int:
    """Start index of `rank`'s torch.chunk-style shard of a dim of `size`."""
    return min(size, rank * -(-size // world))


@dataclass(frozen=True)
class AxisGroup:
    """One mesh axis as the collectives see it: the process group's name, its size and our rank in it."""

    mesh: DeviceMesh
    name: str
    size: int
    rank: int

    @classmethod
    def of(cls, mesh: DeviceMesh) -> "AxisGroup":
        """The (only) axis of a 1-D mesh."""
        return cls(mesh, mesh.get_group().group_name, mesh.size(), mesh.get_local_rank())


class Pending:
    """A started collective; `.wait()` returns its finished plain tensor (post-processed if needed)."""

    __slots__ = ("_tensor", "_finish")

    def __init__(self, tensor, finish=None):
        self._tensor, self._finish = tensor, finish

    def wait(self) -> torch.Tensor:
        out = _c10d.wait_tensor(self._tensor)
        return self._finish(out) if self._finish is not None else out


def all_reduce(t: torch.Tensor, axis: AxisGroup, op: str = "sum") -> Pending:
    """Sum (or max, min, ...) of t over the axis, on every rank (one all-reduce)."""
    return Pending(_c10d.all_reduce(t.contiguous(), op, axis.name))


def all_gather(t: torch.Tensor, dim: int, sizes: tuple[int, ...], axis: AxisGroup) -> Pending:
    """Concatenation along `dim` of every rank's shard, rank r holding sizes[r] (one all-gather)."""
    dim = dim % t.dim()
    pad = max(sizes) - t.shape[dim]
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[:dim] + (pad,) + t.shape[dim + 1:])], dim=dim)
    gathered = _c10d.all_gather_into_tensor(t.contiguous(), axis.size, axis.name)

    def finish(out: torch.Tensor) -> torch.Tensor:
        out = out.view((axis.size,) + t.shape)  # (world, *shard shape)
        if len(set(sizes)) > 1:
            return torch.cat([out[r].narrow(dim, 0, n) for r, n in enumerate(sizes)], dim=dim)
        if dim == 0:
            return out.view((-1,) + t.shape[1:])
        return out.movedim(0, dim).reshape(t.shape[:dim] + (-1,) + t.shape[dim + 1:])

    return Pending(gathered, finish)


def reduce_scatter(t: torch.Tensor, dim: int, sizes: tuple[int, ...], axis: AxisGroup) -> Pending:
    """Sum over the axis of t, of which rank r keeps the sizes[r] slice along `dim` (one reduce-scatter)."""
    dim = dim % t.dim()
    width = max(sizes)
    if dim == 0 and len(set(sizes)) == 1:
        stacked = t.contiguous()
    else:
        pieces, start = [], 0
        for n in sizes:
            piece = t.narrow(dim, start, n)
            start += n
            if n < width:
                piece = torch.cat([piece, t.new_zeros(t.shape[:dim] + (width - n,) + t.shape[dim + 1:])], dim=dim)
            pieces.append(piece)
        stacked = torch.stack(pieces)
    shard_shape = t.shape[:dim] + (width,) + t.shape[dim + 1:]
    flat = stacked.reshape(-1)
    scattered = _c10d.reduce_scatter_tensor(flat, "sum", axis.size, axis.name)
    mine = sizes[axis.rank]

    def finish(out: torch.Tensor) -> torch.Tensor:
        out = out.view(shard_shape)
        return out if mine == width else out.narrow(dim, 0, mine)

    return Pending(scattered, finish)
