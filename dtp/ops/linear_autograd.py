"""The autograd functions of the parallel linear layers: local math on shards plus exactly the collectives the layout needs.

Each layer is one function that computes on the local shards, the input-gradient collective
overlapped with the weight-gradient matmul.  Parameters stay DTensors: forward reads their local
shard, backward returns DTensor gradients with the parameters' own placements and dtype.

Under `torch.autocast` they compute as nn.Linear does there: input, weight and bias cast to the
autocast dtype, the matmuls in it, and each gradient handed back in its tensor's own dtype (input
gradients are converted before they are reduced, as torch's TP reduces them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from torch.distributed.tensor import Partial

from dtp.runtime.mappings import copy_to, gather_from, reduce_from, sequence_gather, sequence_scatter, split_to
from dtp.runtime.collectives import all_gather, all_reduce, chunk_sizes, reduce_scatter
from dtp.runtime.conversions import to_local
from dtp.runtime.grads import grads_by_recompute, node_param_grads, partial_grad, reduced_next
from dtp.runtime.local_shards import Speculation

__all__ = ["ColumnLinearFn", "RowLinearFn", "column_reference", "row_reference"]


def _matmul_grads(g: torch.Tensor, x: torch.Tensor, needs: tuple, bias):
    """dW = gᵀ x and db = Σ g over all leading dims (local), each where the node's inputs need it."""
    need_w, need_b = needs[1], bias is not None and needs[2]
    if g.dim() == 2:
        g2, x2 = g, x
    elif g.dim() > 2:  # (rows, features) views, zero-sized dims included
        g2, x2 = g.flatten(0, -2), x.flatten(0, -2)
    else:  # one input vector
        g2, x2 = g.unsqueeze(0), x.unsqueeze(0)
    grad_w = g2.t().mm(x2) if need_w else None
    grad_b = g2.sum(0) if need_b else None
    return grad_w, grad_b


_any_autocast = torch._C._is_any_autocast_enabled


def _autocast(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    """(x, w, b) cast to the autocast dtype where autocast is on for x's device, as F.linear would be."""
    if not _any_autocast():
        return x, w, b
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point():
        return x, w, b
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), w.to(dtype), (b.to(dtype) if b is not None else None)


def _as_compute(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """dY in the weight's compute dtype, contiguous once (a transposed head view's gradient): dX and dW then read it
    as free views."""
    return (g if g.dtype == w.dtype else g.to(w.dtype)).contiguous()


def _plain(local: torch.Tensor) -> torch.Tensor:
    """A parameter's local shard with no autograd history: itself, or a detached alias where it is a from_local view
    (DDP, the shim); a detach costs ~2 µs, paid only then."""
    return local.detach() if local.requires_grad else local


def _local_params(weight: DTensor, bias: DTensor | None):
    return to_local(weight), (None if bias is None else to_local(bias))


def column_reference(x, weight, bias, axis, in_dim, in_sizes, out_sizes):
    """ColumnLinearFn's math in differentiable ops (dtp.runtime.mappings): what its create_graph backward
    differentiates."""
    if isinstance(in_dim, DTensorSpec):
        x = to_local(x, Partial())
    elif in_dim is None:
        x = copy_to(x, axis)
    else:
        x = sequence_gather(x, in_dim, in_sizes, axis)
    w, b = _local_params(weight, bias)
    x, w, b = _autocast(x, w, b)
    y = F.linear(x, w, b)
    return gather_from(y, -1, out_sizes, axis) if out_sizes is not None else y


def row_reference(x, weight, bias, axis, in_sizes, split_input, out_dim):
    """RowLinearFn's math in differentiable ops (dtp.runtime.mappings): what its create_graph backward
    differentiates."""
    if split_input:
        x = split_to(x, -1, in_sizes, axis)
    w, b = _local_params(weight, bias)
    x, w, _ = _autocast(x, w, None)
    partial = F.linear(x, w)
    if out_dim is None:
        y = reduce_from(partial, axis, inplace=True)
    else:
        sizes = chunk_sizes(partial.shape[out_dim], axis.size)
        y = sequence_scatter(partial, out_dim, sizes, axis)
        if b is not None:  # each rank adds it to its own rows: its gradient is summed (or gathered) over the axis
            b = split_to(b, 0, sizes, axis) if out_dim == y.dim() - 1 else copy_to(b, axis)
    return y if b is None else y + b.to(y.dtype)


class ColumnLinearFn(torch.autograd.Function):
    """Y = X Wᵀ + b, W Shard(0): fwd all-gather X (if sequence-sharded) and Y (if gathered); bwd one collective on dX.

    in_dim: None = X replicated, dX all-reduced; a DTensor spec = X a replicated DTensor (read through
    its local tensor), dX handed back as a DTensor with that (Partial) spec for X's owner to reduce:
    many layers' partial dX are summed first, reduced once, and where dX goes straight to dtp's reduction this
    layer's dW / db run while that reduction is in flight (carried by the gradient, `dtp.runtime.grads`);
    an int = X sharded on that dim (sequence parallel), all-gathered, dX reduce-scattered.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, axis, in_dim, in_sizes, out_sizes):
        w, b = _plain(weight._local_tensor), (None if bias is None else _plain(bias._local_tensor))
        x_dtype, x_in = x.dtype, x
        defer_grads = False
        if isinstance(in_dim, DTensorSpec):  # a replicated DTensor input: its local tensor, no to_local node
            # dX goes straight to dtp's reduction: dW / db may ride along (on one rank there is nothing to overlap, and
            # dW / db computed at once find their inputs still in cache)
            defer_grads = axis.size > 1 and reduced_next(x)
            x = x._local_tensor
        if isinstance(in_sizes, Speculation):  # a plain sequence shard: every rank's length rides in the all-gather
            x_full, in_sizes = in_sizes.gather(x, in_dim, axis)
        else:
            x_full = all_gather(x, in_dim, in_sizes, axis).wait() if isinstance(in_dim, int) else x
        x_full, w, b = _autocast(x_full, w, b)
        y = F.linear(x_full, w, b)
        ctx.save_for_backward(x_full, w)
        ctx.x_in = x_in  # for a create_graph backward only: a reference (unpacking a saved DTensor costs a dispatch)
        ctx.params = (weight, bias)
        ctx.layout = (axis, in_dim, in_sizes, out_sizes, x_dtype, defer_grads)
        if out_sizes is not None:
            y = all_gather(y, -1, out_sizes, axis).wait()
        return y

    @staticmethod
    def backward(ctx, g):
        x_full, w = ctx.saved_tensors
        weight, bias = ctx.params
        axis, in_dim, in_sizes, out_sizes, x_dtype, defer_grads = ctx.layout
        if torch.is_grad_enabled():  # create_graph: differentiable gradients (exact second derivatives)
            return grads_by_recompute(column_reference, (ctx.x_in, weight, bias, axis, in_dim, in_sizes, out_sizes),
                                      (g,), ctx.needs_input_grad)
        if out_sizes is not None:  # gathered output: keep our slice of the (replicated) gradient
            g = g.narrow(-1, sum(out_sizes[: axis.rank]), out_sizes[axis.rank])
        g = _as_compute(g, w)
        needs = ctx.needs_input_grad
        pending = grad_x = None
        if needs[0]:
            grad_x = g.matmul(w).to(x_dtype)  # this rank's share of dX: summed over the axis below
            if in_dim is None:
                pending = all_reduce(grad_x, axis, inplace=True)
            elif isinstance(in_dim, DTensorSpec):  # partial: summed with other readers', reduced by X's owner
                carried = []  # dW / db, run while X's owner reduces dX
                grad_w, grad_b = node_param_grads(ctx, needs, weight, bias, lambda: _matmul_grads(g, x_full, needs, bias),
                                                  carried if defer_grads else None)
                return partial_grad(grad_x, in_dim, tuple(carried)), grad_w, grad_b, None, None, None, None
            else:
                pending = reduce_scatter(grad_x, in_dim, in_sizes, axis)
        grad_w, grad_b = node_param_grads(ctx, needs, weight, bias, lambda: _matmul_grads(g, x_full, needs, bias))
        if pending is not None:
            grad_x = pending.wait()
        return grad_x, grad_w, grad_b, None, None, None, None


class RowLinearFn(torch.autograd.Function):
    """Y = Σ_ranks X_r W_rᵀ + b, W Shard(1): fwd all-reduce (or reduce-scatter on out_dim) of Y; bwd none (all-gather if scattered)."""

    @staticmethod
    def forward(ctx, x, weight, bias, axis, in_sizes, split_input, out_dim):
        w = _plain(weight._local_tensor)
        x_dtype, x_in = x.dtype, x
        if split_input:  # a full input: keep our slice of its last dim, no communication
            x = x.narrow(-1, sum(in_sizes[: axis.rank]), in_sizes[axis.rank])
        x, w, _ = _autocast(x, w, None)
        partial = F.linear(x, w)
        out_sizes = None if out_dim is None else chunk_sizes(partial.shape[out_dim], axis.size)
        # the bookkeeping before the collective, whose wait then follows at once: with ranks sharing CPU cores the
        # collective's thread gets the core as it starts (the small MLP ~6% faster; nothing to overlap here anyway)
        ctx.save_for_backward(x, w)
        ctx.x_in = x_in  # for a create_graph backward only: a reference (unpacking a saved DTensor costs a dispatch)
        ctx.params = (weight, bias)
        ctx.layout = (axis, in_sizes, split_input, out_dim, out_sizes, x_dtype)
        if out_dim is None:
            y = all_reduce(partial, axis, inplace=True).wait()
        else:
            y = reduce_scatter(partial, out_dim, out_sizes, axis).wait()
        if bias is not None:  # once, after the reduction (y is the collective's own fresh output)
            b = _plain(bias._local_tensor)
            if out_dim == y.dim() - 1:  # scattered over the features: our slice of the bias
                b = b.narrow(0, sum(out_sizes[: axis.rank]), out_sizes[axis.rank])
            y.add_(b)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        weight, bias = ctx.params
        axis, in_sizes, split_input, out_dim, out_sizes, x_dtype = ctx.layout
        if torch.is_grad_enabled():  # create_graph: differentiable gradients (exact second derivatives)
            return grads_by_recompute(row_reference, (ctx.x_in, weight, bias, axis, in_sizes, split_input, out_dim),
                                      (g,), ctx.needs_input_grad)
        if out_dim is not None:  # scattered output: every rank needs the whole gradient
            g = all_gather(g, out_dim, out_sizes, axis).wait()
        g = _as_compute(g, w)
        needs = ctx.needs_input_grad
        pending = grad_x = None
        if needs[0]:
            grad_x = g.matmul(w).to(x_dtype)
            if split_input:  # the input was replicated: assemble its full gradient
                pending = all_gather(grad_x, -1, in_sizes, axis)
        grad_w, grad_b = node_param_grads(ctx, needs, weight, bias, lambda: _matmul_grads(g, x, needs, bias))
        if pending is not None:
            grad_x = pending.wait()
        return grad_x, grad_w, grad_b, None, None, None, None
