"""torch's TP semantics on DTensors, the general path of every layer whose layout dtp's fused functions do not cover
(and the traced path under torch.compile): the input redistributed to what the math needs, the DTensor op, the
output redistributed to the layout asked for; the collectives are DTensor's own."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

from dtp.runtime.conversions import from_local, to_local
from dtp.runtime.local_shards import is_guessed, plain_global_shape
from dtp.runtime.sharding import contiguous_stride
from dtp.runtime.traced import is_compiling

__all__ = ["dtensor_forward", "as_local", "wrap_output", "is_last_dim"]


def as_local(x, what: str):
    """(local tensor, its placement on the axis or None for a plain tensor, global shape or None)."""
    if isinstance(x, DTensor):
        if len(x.placements) != 1:
            raise ValueError(f"{what}: expected a DTensor on a 1-D mesh, got placements {x.placements}")
        return to_local(x), x.placements[0], tuple(x.shape)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: input must be a torch.Tensor or DTensor, got {type(x).__name__}")
    return x, None, None


def wrap_output(y: torch.Tensor, mesh: DeviceMesh, placement: Placement, global_shape: Sequence[int]):
    """y as a DTensor with the given placement and global shape (no communication)."""
    return from_local(y, mesh, placement, global_shape)


def is_last_dim(p: Placement, ndim: int) -> bool:
    """p is Shard of the last (feature) dim of an ndim-D tensor."""
    return isinstance(p, Shard) and p.dim % max(ndim, 1) == ndim - 1


def _normalized(p: Placement | None, ndim: int) -> Placement | None:
    """Shard(-1) as Shard(ndim - 1): redistribute wants a dim it can index (torch's styles normalize theirs too)."""
    return Shard(p.dim % ndim) if isinstance(p, Shard) and p.dim < 0 and ndim else p


def dtensor_forward(fn: Callable, x, mesh: DeviceMesh, input_layout: Placement, desired: Placement,
                    output_layout: Placement | None, use_local_output: bool, global_shape=None,
                    where: str = "a tensor-parallel layer"):
    """torch's TP semantics: x (declared input_layout if plain; of global_shape, or of the sizes every rank holds)
    redistributed to `desired`, y = fn(x) on DTensors, y redistributed to output_layout; DTensor's collectives."""
    if isinstance(x, DTensor) and not is_compiling() and is_guessed(x):  # an SP output of a plain shard
        input_layout, x = x.placements[0], to_local(x)
    if not isinstance(x, DTensor):  # a plain Shard: its global shape asked of every rank (torch assumes even)
        input_layout = _normalized(input_layout, x.dim())
        if global_shape is not None:
            x = from_local(x, mesh, input_layout, global_shape)
        else:
            shape = plain_global_shape(x, mesh, input_layout, where)
            x = DTensor.from_local(x, mesh, [input_layout], run_check=False, shape=shape,
                                   stride=contiguous_stride(shape))
    desired = _normalized(desired, x.dim())
    if x.placements != (desired,):
        x = x.redistribute(mesh, [desired])
    y = fn(x)
    if not isinstance(y, DTensor):
        return y
    output_layout = _normalized(output_layout, y.dim())
    if output_layout is not None and y.placements != (output_layout,):
        y = y.redistribute(mesh, [output_layout])
    return to_local(y) if use_local_output else y
