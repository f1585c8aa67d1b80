"""Turning full tensors into DTensor parameters locally: each rank keeps its torch.chunk-style slice."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from .collectives import chunk_offset, chunk_sizes

__all__ = ["contiguous_stride", "local_slice", "local_shape", "shard_parameter"]


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


def shard_parameter(full: torch.Tensor, mesh: DeviceMesh, placement: Placement, *,
                    requires_grad: bool = True) -> nn.Parameter:
    """nn.Parameter(DTensor) holding a copy of this rank's slice of `full` (no communication).

    `full` may be on the meta device: the parameter is then an uninitialised meta shard.
    """
    world, rank = mesh.size(), mesh.get_local_rank()
    if full.device.type == "meta":
        local = torch.empty(local_shape(full.shape, placement, world, rank), dtype=full.dtype, device="meta")
    else:
        local = local_slice(full.detach(), placement, world, rank).clone().contiguous()
    # Built directly (not via from_local, which would make the local tensor a view created without
    # grad tracking): the parameter's local tensor is a plain leaf, so it can be handed to DDP.
    shape = torch.Size(full.shape)
    spec = DTensorSpec(mesh, (placement,), TensorMeta(shape, contiguous_stride(shape), full.dtype))
    return nn.Parameter(DTensor(local, spec, requires_grad=requires_grad), requires_grad=requires_grad)

