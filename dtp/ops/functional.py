"""The math of tensor-parallel linear layers on DTensor parameters, for inputs and outputs in any layout.

The layouts Megatron uses (Column: X replicated or sequence-sharded in, Y sharded on features or
gathered out; Row: X sharded on features or whole in, Y reduced or scattered out) run through one
fused autograd function each (`dtp.ops.linear_autograd`).  Any other layout (a batch-sharded or Partial
input, a Column output sharded on the sequence, ...) takes torch's own DTensor semantics, as torch's
TP styles do: the input redistributed to what the layer needs, the DTensor op, the output
redistributed to the layout asked for.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard

from dtp.runtime.collectives import axis_of, chunk_sizes
from dtp.ops.linear_autograd import ColumnLinearFn, RowLinearFn
from dtp.runtime.traced import is_compiling
from dtp.runtime.conversions import from_local, partial_spec, to_local

__all__ = ["column_linear", "row_linear", "as_local", "wrap_output", "dtensor_forward", "is_last_dim"]


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


def _is_sequence_or_replicate(p: Placement, ndim: int) -> bool:
    return isinstance(p, Replicate) or (isinstance(p, Shard) and not is_last_dim(p, ndim))


def dtensor_forward(fn: Callable, x, mesh: DeviceMesh, input_layout: Placement, desired: Placement,
                    output_layout: Placement | None, use_local_output: bool, global_shape=None):
    """torch's TP semantics: x (declared input_layout if plain; of global_shape, or an even shard) redistributed to
    `desired`, y = fn(x) on DTensors, y redistributed to output_layout; the collectives are DTensor's own."""
    if not isinstance(x, DTensor):
        x = (from_local(x, mesh, input_layout, global_shape) if global_shape is not None
             else DTensor.from_local(x, mesh, [input_layout], run_check=False))
    if x.placements != (desired,):
        x = x.redistribute(mesh, [desired])
    y = fn(x)
    if not isinstance(y, DTensor):
        return y
    if output_layout is not None and y.placements != (output_layout,):
        y = y.redistribute(mesh, [output_layout])
    return y.to_local() if use_local_output else y


def _width_error(name: str, got: int, expected: int, in_features: int, what: str) -> ValueError:
    return ValueError(f"{name}: input last dim is {got} but {what} must have {expected} features "
                      f"(in_features={in_features})")


def column_linear(x, weight: DTensor, bias: DTensor | None = None, *, gather_output: bool = True,
                  input_layout: Placement | None = None, output_layout: Placement | None = None,
                  use_local_output: bool = True, name: str = "column_linear"):
    """Y = X Wᵀ + b with W split by rows (Shard(0)); forward all-gather of Y if gather_output, backward all-reduce of dX.

    X is replicated (a plain tensor counts as `input_layout`, default Replicate) or, for sequence
    parallelism, sharded on a non-feature dim: then the forward all-gathers X and the backward
    reduce-scatters dX instead.  A replicated DTensor X gets a Partial gradient, which DTensor
    reduces where X was made, once for all the layers that read it.  output_layout (default
    Replicate if gather_output, else Shard(-1)) and input layouts beyond these go through DTensor.
    """
    mesh = weight.device_mesh
    in_features, out_features = weight.shape[1], weight.shape[0]
    out_layout = output_layout if output_layout is not None else (Replicate() if gather_output else Shard(-1))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor or DTensor, got {type(x).__name__}")
    ndim = x.dim()
    declared = x.placements[-1] if isinstance(x, DTensor) else (input_layout or Replicate())
    if x.shape[-1] != in_features:
        raise _width_error(name, x.shape[-1], in_features, in_features, "the full input")
    gather = isinstance(out_layout, Replicate)
    if is_compiling():  # traced: DTensor's ops and functional collectives (dtp.runtime.traced), same math
        return dtensor_forward(lambda t: F.linear(t, weight, bias), x, mesh, declared, Replicate(), out_layout,
                               use_local_output)
    if not (_is_sequence_or_replicate(declared, ndim) and (gather or is_last_dim(out_layout, ndim))
            and (not isinstance(x, DTensor) or x.device_mesh.ndim == 1)):
        return dtensor_forward(lambda t: F.linear(t, weight, bias), x, mesh, declared, Replicate(), out_layout,
                               use_local_output)
    axis = axis_of(mesh)
    in_dim = in_sizes = None
    if isinstance(x, DTensor) and isinstance(declared, Replicate):
        # Its owner reduces the gradient (DTensor Partial -> Replicate), once for all its consumers.
        in_dim = partial_spec(x._spec)  # read in place by the layer; dX comes back Partial
        placement = global_shape = None
    else:
        x, placement, global_shape = as_local(x, name)
        placement = placement if placement is not None else declared
    if isinstance(placement, Shard):
        in_dim = placement.dim % x.dim()
        full = global_shape[in_dim] if global_shape is not None else x.shape[in_dim] * axis.size
        in_sizes = chunk_sizes(full, axis.size)
    out_sizes = chunk_sizes(out_features, axis.size) if gather else None
    y = ColumnLinearFn.apply(x, weight, bias, axis, in_dim, in_sizes, out_sizes)
    if use_local_output:
        return y
    return wrap_output(y, mesh, Replicate() if gather else Shard(y.dim() - 1), y.shape[:-1] + (out_features,))


def row_linear(x, weight: DTensor, bias: DTensor | None = None, *, input_is_parallel: bool = True,
               input_layout: Placement | None = None, output_layout: Placement | None = None,
               use_local_output: bool = True, name: str = "row_linear"):
    """Y = Σ_r X_r W_rᵀ + b with W split by columns (Shard(1)); forward all-reduce (Replicate) or reduce-scatter (Shard(d)) of Y.

    X is this rank's slice of the last dim (`input_is_parallel`, `input_layout=Shard(-1)` or such a
    DTensor) or the full input (Replicate), sliced locally (its gradient is then all-gathered in the
    backward).  The bias is added once, after the reduction.  Other input layouts (batch-sharded,
    Partial) go through DTensor.
    """
    mesh = weight.device_mesh
    in_features = weight.shape[1]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor or DTensor, got {type(x).__name__}")
    ndim = x.dim()
    if isinstance(x, DTensor):
        declared = x.placements[-1]
    else:
        declared = input_layout if input_layout is not None else (Shard(-1) if input_is_parallel else Replicate())
    out_layout = output_layout or Replicate()
    if not ((isinstance(declared, Replicate) or is_last_dim(declared, ndim))
            and isinstance(out_layout, (Replicate, Shard))
            and (not isinstance(x, DTensor) or x.device_mesh.ndim == 1)):
        if isinstance(x, DTensor) and x.shape[-1] != in_features:
            raise _width_error(name, x.shape[-1], in_features, in_features, "the full (global) input")
        return dtensor_forward(lambda t: F.linear(t, weight, bias), x, mesh, declared, Shard(ndim - 1), out_layout,
                               use_local_output)
    if is_compiling():  # traced: DTensor's ops and functional collectives (dtp.runtime.traced), same math
        shape = None if isinstance(x, DTensor) or not is_last_dim(declared, ndim) else x.shape[:-1] + (in_features,)
        return dtensor_forward(lambda t: F.linear(t, weight, bias), x, mesh, declared, Shard(ndim - 1), out_layout,
                               use_local_output, global_shape=shape)
    axis = axis_of(mesh)
    x, _, _ = as_local(x, name)
    split_input = isinstance(declared, Replicate)
    in_sizes = chunk_sizes(in_features, axis.size)
    expected = in_features if split_input else in_sizes[axis.rank]
    if x.shape[-1] != expected:
        what = "the full input" if split_input else f"this rank's slice of the input (rank {axis.rank} of {axis.size})"
        raise _width_error(name, x.shape[-1], expected, in_features, what)
    out_dim = out_layout.dim % x.dim() if isinstance(out_layout, Shard) else None
    y = RowLinearFn.apply(x, weight, bias, axis, in_sizes, split_input, out_dim)
    if use_local_output:
        return y
    out_shape = list(y.shape)
    if out_dim is not None:
        out_shape[out_dim] = x.shape[out_dim] if out_dim != x.dim() - 1 else weight.shape[0]
    return wrap_output(y, mesh, Shard(out_dim) if out_dim is not None else Replicate(), out_shape)
