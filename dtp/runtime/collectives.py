"""Collectives on local shards over one mesh axis, with torch.chunk-style uneven shards.

They issue torch.distributed's c10d collectives (asynchronously, on the mesh axis's process
group; an all-reduce through the group's own `allreduce`, as `dist.all_reduce` does after its
checks) directly on plain tensors, so the hot path pays for the communication and nothing else:
measured here, the `_c10d_functional` ops cost ~60 µs more per call in Python dispatch.  Each
returns a `Pending` handle: start the collective, do other work, then `.wait()`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

# torch >= 2.13 renamed the single-tensor gather / scatter (the old names warn on every call)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
try:  # torch >= 2.13: a DTensor made in eager after a compile may carry a traced (fake-wrapped) mesh
    from torch._library.fake_class_registry import maybe_unwrap_fake_script_object as _real_mesh
except ImportError:  # older torch never wraps meshes
    def _real_mesh(mesh):
        return mesh
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}

__all__ = ["AxisGroup", "axis_of", "group_is_alive", "chunk_sizes", "chunk_offset", "Pending",
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
    """One mesh axis as the collectives see it: its process group, its size and our rank in it."""

    mesh: DeviceMesh
    group: object
    size: int
    rank: int

    def __deepcopy__(self, memo) -> "AxisGroup":
        return self  # a handle on live process groups, shared, never copied (Dynamo deep-copies DTensor specs)

    @classmethod
    def of(cls, mesh: DeviceMesh) -> "AxisGroup":
        """The (only) axis of a 1-D mesh."""
        return cls(mesh, mesh.get_group(), mesh.size(), mesh.get_local_rank())


def group_is_alive(group) -> bool:
    """group is still registered with torch.distributed (not destroyed by destroy_process_group)."""
    return group in dist.distributed_c10d._world.pg_map


_AXES: dict[int, tuple] = {}  # id(mesh) -> (weakref to that mesh, its AxisGroup): never stored on the mesh itself


def axis_of(mesh: DeviceMesh) -> AxisGroup:
    """The collective group of a 1-D tensor-parallel mesh, cached per mesh object (by identity, off the mesh: anything
    on a mesh travels into every DTensor's pickle, and a ProcessGroup cannot be pickled) while its group lives:
    meshes compare equal across a destroy / init of the process group, their groups do not."""
    mesh = _real_mesh(mesh)  # as torch's own collectives unwrap it
    key = id(mesh)
    hit = _AXES.get(key)
    if hit is not None and hit[0]() is mesh and group_is_alive(hit[1].group):
        return hit[1]
    axis = AxisGroup.of(mesh)

    def forget(ref, key=key):
        if _AXES.get(key, (None,))[0] is ref:
            del _AXES[key]

    _AXES[key] = (weakref.ref(mesh, forget), axis)
    return axis


class Pending:
    """A started collective; `.wait()` returns its finished plain tensor (post-processed if needed)."""

    __slots__ = ("_work", "_tensor", "_finish")

    def __init__(self, work, tensor, finish=None):
        self._work, self._tensor, self._finish = work, tensor, finish

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        return self._finish(self._tensor) if self._finish is not None else self._tensor


_ALLREDUCE_OPTIONS: dict = {}  # reduce op name -> c10d AllreduceOptions (asynchronous)
# torch internals the direct all-reduce relies on, probed once; without them every all-reduce is dist.all_reduce's
_coalescing = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_coalesce_state", None)
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)
DIRECT_ALLREDUCE = _coalescing is not None and _function_mode_on is not None and hasattr(dist, "AllreduceOptions")


def _allreduce_options(op: str):
    opts = _ALLREDUCE_OPTIONS.get(op)
    if opts is None:
        opts = dist.AllreduceOptions()
        opts.reduceOp = _OPS[op]
        if hasattr(opts, "asyncOp"):  # torch >= 2.8
            opts.asyncOp = True
        _ALLREDUCE_OPTIONS[op] = opts
    return opts


def all_reduce(t: torch.Tensor, axis: AxisGroup, op: str = "sum", *, inplace: bool = False) -> Pending:
    """Sum (or max, min) of t over the axis, on every rank (one all-reduce).  With inplace (for a fresh tensor
    nobody else holds) the result is written into t; otherwise t is left alone."""
    out = t if inplace and t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
    if axis.size == 1:
        return Pending(None, out)
    if not DIRECT_ALLREDUCE or out.is_complex() or _coalescing or _function_mode_on():  # dist.all_reduce's own cases
        return Pending(dist.all_reduce(out, _OPS[op], group=axis.group, async_op=True), out)
    # the process group's own c10d all-reduce, as dist.all_reduce issues it (~15 µs less of Python a call)
    return Pending(axis.group.allreduce([out], _allreduce_options(op)), out)


def all_gather(t: torch.Tensor, dim: int, sizes: tuple[int, ...], axis: AxisGroup) -> Pending:
    """Concatenation along `dim` of every rank's shard, rank r holding sizes[r] (one all-gather)."""
    dim = dim % t.dim()
    pad = max(sizes) - t.shape[dim]
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[:dim] + (pad,) + t.shape[dim + 1:])], dim=dim)
    t = t.contiguous()
    gathered = t.new_empty((axis.size * t.shape[0],) + t.shape[1:]) if t.dim() else t.new_empty(axis.size)
    work = _all_gather_single(gathered, t, group=axis.group, async_op=True) if axis.size > 1 else None
    if axis.size == 1:
        gathered.copy_(t)

    def finish(out: torch.Tensor) -> torch.Tensor:
        out = out.view((axis.size,) + t.shape)  # (world, *shard shape)
        if len(set(sizes)) > 1:
            return torch.cat([out[r].narrow(dim, 0, n) for r, n in enumerate(sizes)], dim=dim)
        whole = t.shape[:dim] + (axis.size * t.shape[dim],) + t.shape[dim + 1:]  # explicit: empty tensors too
        if dim == 0:
            return out.view(whole)
        return out.movedim(0, dim).reshape(whole)

    return Pending(work, gathered, finish)


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
    scattered = flat.new_empty(flat.numel() // axis.size)
    work = _reduce_scatter_single(scattered, flat, group=axis.group, async_op=True) if axis.size > 1 else None
    if axis.size == 1:
        scattered.copy_(flat)
    mine = sizes[axis.rank]

    def finish(out: torch.Tensor) -> torch.Tensor:
        out = out.view(shard_shape)
        return out if mine == width else out.narrow(dim, 0, mine)

    return Pending(work, scattered, finish)
