"""Differentiable collectives on local tensors (Megatron's "mappings"), each naming its forward and backward.
(The linear layers fuse theirs into one autograd function each, in dtp.functional.)

    reduce_from       fwd all-reduce        bwd identity         (after a row-split computation)
    gather_from       fwd all-gather        bwd keep own slice   (replicate a sharded output)
    sequence_scatter  fwd reduce-scatter    bwd all-gather       (sequence parallel: partial -> shards)
    replicated_local  a replicated DTensor parameter's local tensor; its gradient is all-reduced,
                      for parameters used on sequence shards (norm weights)
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from .collectives import AxisGroup, all_gather, all_reduce, reduce_scatter
from .param_grads import hand_over

__all__ = ["reduce_from", "gather_from", "sequence_scatter", "replicated_local"]


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        y = all_reduce(x, axis, inplace=True).wait()  # x is its caller's fresh partial sum
        if y is x:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, axis):
        ctx.layout = (dim % x.dim(), sizes, axis)
        return all_gather(x, dim, sizes, axis).wait()

    @staticmethod
    def backward(ctx, g):
        dim, sizes, axis = ctx.layout
        return g.narrow(dim, sum(sizes[: axis.rank]), sizes[axis.rank]), None, None, None


class _SequenceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, axis):
        ctx.layout = (dim, sizes, axis)
        return reduce_scatter(x, dim, sizes, axis).wait()

    @staticmethod
    def backward(ctx, g):
        dim, sizes, axis = ctx.layout
        return all_gather(g, dim, sizes, axis).wait(), None, None, None


class _ReplicatedLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param, axis):
        ctx.param, ctx.axis = param, axis
        local = param._local_tensor
        return local.view_as(local)

    @staticmethod
    def backward(ctx, g):
        return hand_over(ctx.next_functions, 0, all_reduce(g, ctx.axis).wait(), ctx.param), None


def reduce_from(x: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    """Y = Σ_ranks X; forward all-reduce (in place: pass a fresh tensor nobody else reads), backward identity."""
    return _ReduceFrom.apply(x, axis)


def gather_from(x: torch.Tensor, dim: int, sizes, axis: AxisGroup) -> torch.Tensor:
    """Y = concat_ranks(X) along dim; forward all-gather, backward keeps this rank's slice (no collective)."""
    return _GatherFrom.apply(x, dim, tuple(sizes), axis)


def sequence_scatter(x: torch.Tensor, dim: int, sizes, axis: AxisGroup) -> torch.Tensor:
    """Y = this rank's slice along dim of Σ_ranks X; forward reduce-scatter, backward all-gather."""
    return _SequenceScatter.apply(x, dim % x.dim(), tuple(sizes), axis)


def replicated_local(param: DTensor, axis: AxisGroup) -> torch.Tensor:
    """The local tensor of a replicated DTensor parameter; backward all-reduces its gradient (Partial -> Replicate)."""
    return _ReplicatedLocal.apply(param, axis)

