"""The math of tensor-parallel linear layers on DTensor parameters.

Each layer is one autograd function that computes on the local shards and issues exactly the
collectives its layout needs (Megatron's minimum), the input-gradient collective overlapped
with the weight-gradient matmul.  Parameters stay DTensors: forward reads their local shard,
backward returns DTensor gradients with the parameters' own placements.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from .collectives import all_gather, all_reduce, axis_of, chunk_sizes, reduce_scatter
from .views import from_local, to_local

__all__ = ["column_linear", "row_linear", "as_local", "wrap_output"]


def _grad_dtensor(local: torch.Tensor | None, param: DTensor):
    """Wrap a local gradient shard as a DTensor laid out exactly like `param` (no communication)."""
    if local is None:
        return None
    # DTensor.__new__ alone: DTensor.__init__ only adds a dynamo-disabling wrapper (~1.5 µs a call)
    return DTensor.__new__(DTensor, local.contiguous(), param._spec, requires_grad=False)


def _matmul_grads(g: torch.Tensor, x: torch.Tensor, need_w: bool, need_b: bool):
    """dW = gᵀ x and db = Σ g over all leading dims (local)."""
    if g.dim() == 2:
        g2, x2 = g, x
    else:
        rows = math.prod(g.shape[:-1])
        g2, x2 = g.reshape(rows, g.shape[-1]), x.reshape(rows, x.shape[-1])
    grad_w = g2.t().mm(x2) if need_w else None
    grad_b = g2.sum(0) if need_b else None
    return grad_w, grad_b


PARTIAL_GRAD = "partial"


class ColumnLinearFn(torch.autograd.Function):
    """Y = X Wᵀ + b, W Shard(0): fwd all-gather X (if sequence-sharded) and Y (if gathered); bwd one collective on dX.

    in_dim: None = X replicated, dX all-reduced; PARTIAL_GRAD = X replicated, dX left partial for
    the caller to reduce (a DTensor input: many layers' partial dX are summed first, reduced once);
    an int = X sharded on that dim (sequence parallel), all-gathered, dX reduce-scattered.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, axis, in_dim, in_sizes, out_sizes):
        w = weight._local_tensor.detach()  # a plain alias: the param may be a from_local view (DDP, the shim)
        x_full = all_gather(x, in_dim, in_sizes, axis).wait() if isinstance(in_dim, int) else x
        y = F.linear(x_full, w, None if bias is None else bias._local_tensor)
        ctx.save_for_backward(x_full, w)
        ctx.params = (weight, bias)
        ctx.layout = (axis, in_dim, in_sizes, out_sizes)
        if out_sizes is not None:
            y = all_gather(y, -1, out_sizes, axis).wait()
        return y

    @staticmethod
    def backward(ctx, g):
        x_full, w = ctx.saved_tensors
        weight, bias = ctx.params
        axis, in_dim, in_sizes, out_sizes = ctx.layout
        if out_sizes is not None:  # gathered output: keep our slice of the (replicated) gradient
            g = g.narrow(-1, sum(out_sizes[: axis.rank]), out_sizes[axis.rank])
        pending = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g.matmul(w)  # this rank's share of dX: summed over the axis below
            if in_dim is None:
                pending = all_reduce(grad_x, axis, inplace=True)
            elif in_dim is not PARTIAL_GRAD:
                pending = reduce_scatter(grad_x, in_dim, in_sizes, axis)
        grad_w, grad_b = _matmul_grads(g, x_full, ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if pending is not None:
            grad_x = pending.wait()
        return (grad_x, _grad_dtensor(grad_w, weight), _grad_dtensor(grad_b, bias), None, None, None, None)


class RowLinearFn(torch.autograd.Function):
    """Y = Σ_ranks X_r W_rᵀ + b, W Shard(1): fwd all-reduce (or reduce-scatter) of Y; bwd none (all-gather if scattered)."""

    @staticmethod
    def forward(ctx, x, weight, bias, axis, in_sizes, split_input, out_dim):
        w = weight._local_tensor.detach()  # a plain alias: the param may be a from_local view (DDP, the shim)
        if split_input:  # a full input: keep our slice of its last dim, no communication
            x = x.narrow(-1, sum(in_sizes[: axis.rank]), in_sizes[axis.rank])
        partial = F.linear(x, w)
        if out_dim is None:
            y = all_reduce(partial, axis, inplace=True).wait()
            out_sizes = None
        else:
            out_sizes = chunk_sizes(partial.shape[out_dim], axis.size)
            y = reduce_scatter(partial, out_dim, out_sizes, axis).wait()
        if bias is not None:
            y.add_(bias._local_tensor)  # once, after the reduction (y is the collective's own fresh output)
        ctx.save_for_backward(x, w)
        ctx.params = (weight, bias)
        ctx.layout = (axis, in_sizes, split_input, out_dim, out_sizes)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        weight, bias = ctx.params
        axis, in_sizes, split_input, out_dim, out_sizes = ctx.layout
        if out_dim is not None:  # scattered output: every rank needs the whole gradient
            g = all_gather(g, out_dim, out_sizes, axis).wait()
        pending = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g.matmul(w)
            if split_input:  # the input was replicated: assemble its full gradient
                pending = all_gather(grad_x, -1, in_sizes, axis)
        grad_w, grad_b = _matmul_grads(g, x, ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if pending is not None:
            grad_x = pending.wait()
        return (grad_x, _grad_dtensor(grad_w, weight), _grad_dtensor(grad_b, bias), None, None, None, None)


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


def _is_sequence_or_replicate(p: Placement, ndim: int) -> bool:
    return isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim % ndim != ndim - 1)


def _normalize_dim(p: Placement, ndim: int) -> Placement:
    return Shard(p.dim % ndim) if isinstance(p, Shard) else p


def column_linear(x, weight: DTensor, bias: DTensor | None = None, *, gather_output: bool = True,
                  input_layout: Placement | None = None, use_local_output: bool = True):
    """Y = X Wᵀ + b with W split by rows (Shard(0)); forward all-gather of Y if gather_output, backward all-reduce of dX.

    X is replicated (a plain tensor counts as Replicate) or, for sequence parallelism, sharded on
    a non-last dim (`input_layout=Shard(1)` or such a DTensor): then the forward all-gathers X and
    the backward reduce-scatters dX instead.  A replicated DTensor X gets a Partial gradient, which
    DTensor reduces where X was made, once for all the layers that read it.
    """
    mesh = weight.device_mesh
    axis = axis_of(mesh)
    if isinstance(x, DTensor) and not _is_sequence_or_replicate(x.placements[-1], x.dim()):
        x = x.redistribute(x.device_mesh, [Replicate()])  # e.g. Partial or feature-sharded: make it whole
    in_dim = in_sizes = None
    if isinstance(x, DTensor) and isinstance(x.placements[-1], Replicate):
        # Its owner reduces the gradient (DTensor Partial -> Replicate), once for all its consumers.
        x, placement, global_shape, in_dim = to_local(x, Partial()), Replicate(), None, PARTIAL_GRAD
    else:
        x, placement, global_shape = as_local(x, "column_linear")
        placement = placement if placement is not None else (input_layout or Replicate())
    if not _is_sequence_or_replicate(placement, x.dim()):
        raise ValueError(f"column_linear: input_layout must be Replicate() or Shard(d) on a non-feature "
                         f"dim d (sequence parallel), got {placement!r}")
    if isinstance(placement, Shard):
        in_dim = placement.dim % x.dim()
        full = global_shape[in_dim] if global_shape is not None else x.shape[in_dim] * axis.size
        in_sizes = chunk_sizes(full, axis.size)
    out_features = weight.shape[0]
    out_sizes = chunk_sizes(out_features, axis.size) if gather_output else None
    y = ColumnLinearFn.apply(x, weight, bias, axis, in_dim, in_sizes, out_sizes)
    if use_local_output:
        return y
    return wrap_output(y, mesh, Replicate() if gather_output else Shard(y.dim() - 1), y.shape[:-1] + (out_features,))


def row_linear(x, weight: DTensor, bias: DTensor | None = None, *, input_is_parallel: bool = True,
               output_layout: Placement | None = None, use_local_output: bool = True):
    """Y = Σ_r X_r W_rᵀ + b with W split by columns (Shard(1)); forward all-reduce (Replicate) or reduce-scatter (Shard(d)) of Y.

    X is this rank's slice of the last dim (`input_is_parallel`, or a Shard(-1) DTensor) or the
    full input, sliced locally (its gradient is then all-gathered in the backward).  The bias is
    added once, after the reduction.
    """
    mesh = weight.device_mesh
    axis = axis_of(mesh)
    if isinstance(x, DTensor) and not (isinstance(x.placements[-1], Replicate) or x.placements[-1] == Shard(x.dim() - 1)):
        x = x.redistribute(x.device_mesh, [Shard(x.dim() - 1)])
    x, placement, global_shape = as_local(x, "row_linear")
    in_features = weight.shape[1]
    if placement is None:
        split_input = not input_is_parallel
    elif isinstance(placement, Replicate):
        split_input = True
    elif isinstance(placement, Shard) and placement.dim % x.dim() == x.dim() - 1:
        split_input = False
    else:
        raise AssertionError("unreachable: other layouts were redistributed above")
    in_sizes = chunk_sizes(in_features, axis.size)
    expected = in_features if split_input else in_sizes[axis.rank]
    if x.shape[-1] != expected:
        what = "the full input" if split_input else f"this rank's slice of the input (rank {axis.rank} of {axis.size})"
        raise ValueError(f"row_linear: input last dim is {x.shape[-1]} but {what} must have {expected} "
                         f"features (in_features={in_features})")
    out_layout = _normalize_dim(output_layout or Replicate(), x.dim())
    if not isinstance(out_layout, (Replicate, Shard)) or (isinstance(out_layout, Shard) and out_layout.dim == x.dim() - 1):
        raise ValueError(f"row_linear: output_layout must be Replicate() or Shard(d) with d not the "
                         f"feature dim, got {output_layout!r}")
    out_dim = out_layout.dim if isinstance(out_layout, Shard) else None
    y = RowLinearFn.apply(x, weight, bias, axis, in_sizes, split_input, out_dim)
    if use_local_output:
        return y
    out_shape = list(y.shape)
    if out_dim is not None:
        out_shape[out_dim] = x.shape[out_dim]
    return wrap_output(y, mesh, out_layout, out_shape)
