"""Turning full tensors into DTensor parameters: each rank keeps its torch.chunk-style slice.

A parameter that is already a DTensor on the same mesh is taken as it is (the same layout) or
sliced locally (a replicated one), so a plan may be applied in several calls; a DTensor is never
wrapped inside another one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from dtp.runtime.collectives import chunk_offset, chunk_sizes

__all__ = ["contiguous_stride", "local_slice", "local_shape", "same_placement", "laid_out", "shard_parameter",
           "broadcast_from"]


def contiguous_stride(shape) -> tuple[int, ...]:
    """Row-major strides of `shape`."""
    stride, step = [], 1
    for n in reversed(tuple(shape)):
        stride.insert(0, step)
        step *= max(int(n), 1)
    return tuple(stride)


def local_shape(shape, placement: Placement, world: int, rank: int) -> tuple[int, ...]:
    """Shape of rank's shard of a tensor of global `shape` under `placement`."""
    shape = list(shape)
    if isinstance(placement, Shard):
        shape[placement.dim] = chunk_sizes(shape[placement.dim], world)[rank]
    return tuple(shape)


def local_slice(full: torch.Tensor, placement: Placement, world: int, rank: int) -> torch.Tensor:
    """rank's slice of `full` under `placement` (a view; Replicate keeps everything)."""
    if isinstance(placement, Shard):
        dim = placement.dim % full.dim()
        size = full.shape[dim]
        return full.narrow(dim, chunk_offset(size, world, rank), chunk_sizes(size, world)[rank])
    return full


def same_placement(a: Placement, b: Placement, ndim: int) -> bool:
    """a and b lay out an ndim-D tensor alike (Shard(-1) and Shard(ndim - 1) are the same)."""
    if isinstance(a, Shard) and isinstance(b, Shard):
        return a.dim % max(ndim, 1) == b.dim % max(ndim, 1)
    return a == b


def laid_out(t, placement: Placement) -> bool:
    """t is a DTensor on a 1-D mesh laid out as placement (what dtp's split ops read through its local tensor)."""
    return isinstance(t, DTensor) and t._spec.placements == (placement,)


def shard_parameter(full: torch.Tensor, mesh: DeviceMesh, placement: Placement, *,
                    requires_grad: bool | None = None, what: str = "parameter") -> nn.Parameter:
    """nn.Parameter(DTensor) holding a copy of this rank's slice of `full` (no communication).

    `full` may be on the meta device (the shard is then uninitialised meta), or a DTensor already on
    `mesh`: laid out as asked, it is kept; replicated, its local tensor is sliced.  requires_grad
    defaults to full's own (a frozen parameter stays frozen; a fresh tensor becomes trainable).
    """
    if requires_grad is None:
        requires_grad = full.requires_grad if isinstance(full, nn.Parameter) else True
    world, rank = mesh.size(), mesh.get_local_rank()
    if isinstance(full, DTensor):
        if full.device_mesh != mesh:
            raise ValueError(f"{what} is already a DTensor on another device mesh ({full.device_mesh}); "
                             f"this plan splits it on {mesh}")
        if len(full.placements) == 1 and same_placement(full.placements[0], placement, full.dim()):
            return full if isinstance(full, nn.Parameter) and full.requires_grad == requires_grad else \
                nn.Parameter(full.detach(), requires_grad=requires_grad)
        if full.placements != (Replicate(),):
            raise ValueError(f"{what} is already split as {list(full.placements)}; it cannot be split again as "
                             f"{placement!r}")
        full = full._local_tensor  # replicated: every rank holds the whole tensor, sliced below
    if full.device.type == "meta":
        local = torch.empty(local_shape(full.shape, placement, world, rank), dtype=full.dtype, device="meta")
    else:
        local = local_slice(full.detach(), placement, world, rank).clone().contiguous()
    assert not isinstance(local, DTensor), "a DTensor must never hold a DTensor"
    # Built directly (not via from_local, which would make the local tensor a view created without
    # grad tracking): the parameter's local tensor is a plain leaf, so it can be handed to DDP.
    shape = torch.Size(full.shape)
    spec = DTensorSpec(mesh, (placement,), TensorMeta(shape, contiguous_stride(shape), full.dtype))
    # DTensor.__new__ alone: DTensor.__init__ is only a dynamo-disabling wrapper, whose first call imports dynamo (~1.5 s)
    return nn.Parameter(DTensor.__new__(DTensor, local, spec, requires_grad=requires_grad), requires_grad=requires_grad)


@torch.no_grad()
def broadcast_from(tensors, mesh: DeviceMesh, src: int) -> None:
    """Overwrite each plain tensor with mesh rank `src`'s values: one broadcast per tensor over the mesh
    (all started, then waited).  Meta tensors and DTensors (already laid out) are skipped."""
    if mesh.size() == 1:
        return
    if not isinstance(src, int) or isinstance(src, bool) or not 0 <= src < mesh.size():
        raise ValueError(f"src_data_rank must be None or a rank of the {mesh.size()}-rank mesh, got {src!r}")
    group = mesh.get_group()
    root = dist.get_global_rank(group, src)
    pending, seen = [], set()
    for t in tensors:
        if isinstance(t, DTensor) or t.device.type == "meta" or id(t) in seen:
            continue
        seen.add(id(t))
        buffer = t.data if t.is_contiguous() else t.data.contiguous()
        pending.append((t, buffer, dist.broadcast(buffer, src=root, group=group, async_op=True)))
    for t, buffer, work in pending:
        work.wait()
        if buffer is not t.data:
            t.data.copy_(buffer)
