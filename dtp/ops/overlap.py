"""Chunked (pipelined) row-parallel linear: the forward all-reduce of one batch chunk overlaps the next chunk's matmul.

The math and gradients are RowLinearFn's (input sharded on its last dim, W Shard(1), b Replicate):
Y = Σ_r X_r W_rᵀ + b.  The leading rows of X are split into `chunks` pieces; the partial product
of piece i is written into its rows of one output buffer and its all-reduce is started
asynchronously before piece i+1's matmul, as async tensor parallelism pipelines its collectives.
Backward needs no collective (dX = dY W_r stays sharded, dW_r = dYᵀ X_r, db = Σ dY), so it is
the plain local math, with gradients handed back as DTensors laid out like the parameters (dtp.runtime.grads).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from dtp.runtime.collectives import axis_of
from dtp.ops.linear_autograd import row_reference
from dtp.runtime.grads import grads_by_recompute, param_grad

__all__ = ["ChunkedRowLinearFn", "chunked_row_linear", "chunk_rows"]


def chunk_rows(rows: int, chunks: int) -> list[tuple[int, int]]:
    """(start, length) of each non-empty piece when `rows` rows are cut into `chunks` torch.chunk-style pieces."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise ValueError(f"chunks must be a positive int, got {chunks!r}")
    step = -(-rows // chunks) if rows else 0
    return [(start, min(step, rows - start)) for start in range(0, rows, step)] if rows else []


def _autocast(x: torch.Tensor, w: torch.Tensor):
    """(x, w) cast to the autocast dtype where autocast is on for x's device, as F.linear would be."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or not x.is_floating_point():
        return x, w
    dtype = torch.get_autocast_dtype(device)
    return x.to(dtype), w.to(dtype)


def _reference(x, weight, bias, group, chunks):
    return row_reference(x, weight, bias, axis_of(weight.device_mesh), None, False, None)


class ChunkedRowLinearFn(torch.autograd.Function):
    """Y = Σ_r X_r W_rᵀ + b, W Shard(1), b Replicate: fwd one all-reduce per row chunk, each overlapping the next
    chunk's matmul; bwd none (dX = dY W_r local)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, chunks):
        w = weight._local_tensor.detach()  # a plain alias of the local shard
        x_dtype, x_in = x.dtype, x
        x, w = _autocast(x, w)
        lead = x.shape[:-1]
        x2 = x.reshape(math.prod(lead), x.shape[-1])  # explicit rows: a zero-width shard has no -1 to infer
        y = x2.new_empty((x2.shape[0], w.shape[0]))  # fresh and contiguous: each chunk's rows are a contiguous view
        works = []
        for start, n in chunk_rows(x2.shape[0], chunks):
            part = y.narrow(0, start, n)
            torch.mm(x2.narrow(0, start, n), w.t(), out=part)
            if group is not None:  # started now; the next chunk's matmul runs while it travels
                works.append(dist.all_reduce(part, group=group, async_op=True))
        for work in works:
            work.wait()
        if bias is not None:  # once, after the reduction
            y.add_(bias._local_tensor.detach())
        ctx.save_for_backward(x2, w)
        ctx.x_in = x_in  # for a create_graph backward only
        ctx.params = (weight, bias)
        ctx.meta = (x.shape, x_dtype)
        return y.view(*lead, w.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, w = ctx.saved_tensors
        weight, bias = ctx.params
        if torch.is_grad_enabled():  # create_graph: the same math differentiably (exact second derivatives)
            return grads_by_recompute(_reference, (ctx.x_in, weight, bias, None, None), (g,), ctx.needs_input_grad)
        x_shape, x_dtype = ctx.meta
        g2 = g.reshape(x2.shape[0], g.shape[-1])
        if g2.dtype != w.dtype:
            g2 = g2.to(w.dtype)
        grad_x = g2.mm(w).to(x_dtype).view(x_shape) if ctx.needs_input_grad[0] else None
        grad_w = g2.t().mm(x2) if ctx.needs_input_grad[1] else None
        grad_b = g2.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return (grad_x, param_grad(grad_w, weight._spec, weight.dtype),
                param_grad(grad_b, bias._spec, bias.dtype) if bias is not None else None, None, None)


def chunked_row_linear(x: torch.Tensor, weight: DTensor, bias: DTensor | None = None, chunks: int = 2) -> torch.Tensor:
    """Y = Σ_r X_r W_rᵀ + b with X this rank's last-dim shard, W Shard(1), b Replicate; `chunks` all-reduces of Y's rows."""
    chunk_rows(0, chunks)  # validates chunks
    if not isinstance(weight, DTensor) or weight.placements != (Shard(1),) or weight.dim() != 2:
        raise ValueError(f"chunked_row_linear: weight must be a 2-D DTensor placed (Shard(1),) on a 1-D mesh, "
                         f"got {type(weight).__name__} {getattr(weight, 'placements', '')}")
    if bias is not None and (not isinstance(bias, DTensor) or bias.placements != (Replicate(),)
                             or bias.device_mesh != weight.device_mesh):
        raise ValueError(f"chunked_row_linear: bias must be a DTensor placed (Replicate(),) on the weight's mesh, "
                         f"got {type(bias).__name__} {getattr(bias, 'placements', '')}")
    if isinstance(x, DTensor) or not isinstance(x, torch.Tensor):
        raise TypeError(f"chunked_row_linear: x must be a plain tensor (this rank's shard), got {type(x).__name__}")
    width = weight.to_local().shape[1]
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"chunked_row_linear: x's last dim must be this rank's weight shard width {width}, "
                         f"got shape {tuple(x.shape)}")
    mesh = weight.device_mesh
    group = mesh.get_group() if mesh.size() > 1 else None
    return ChunkedRowLinearFn.apply(x, weight, bias, group, chunks)
