"""Differentiable collectives on local tensors (Megatron's "mappings"), each naming its forward and backward.
(The linear layers fuse theirs into one autograd function each, in dtp.linear_autograd.)

    copy_to           fwd identity          bwd all-reduce       (a replicated input read by a split computation)
    reduce_from       fwd all-reduce        bwd identity         (after a row-split computation)
    split_to          fwd keep own slice    bwd all-gather       (a replicated input cut for a row-split one)
    gather_from       fwd all-gather        bwd keep own slice   (replicate a sharded output)
    sequence_scatter  fwd reduce-scatter    bwd all-gather       (sequence parallel: partial -> shards)
    sequence_gather   fwd all-gather        bwd reduce-scatter   (sequence parallel: shards -> whole, partial dX)

The pairs are each other's adjoints, and each backward is its partner's forward: in a backward run
under `create_graph=True` (grad mode on) a backward applies its partner as an autograd function,
so gradients of gradients (a gradient penalty, `gradgradcheck`) are exact; in a plain backward it
issues the bare collective.
"""

from __future__ import annotations

import torch

from dtp.runtime.collectives import AxisGroup, all_gather, all_reduce, reduce_scatter

__all__ = ["copy_to", "reduce_from", "split_to", "gather_from", "sequence_scatter", "sequence_gather"]


def _own_slice(g: torch.Tensor, dim: int, sizes: tuple, axis: AxisGroup) -> torch.Tensor:
    return g.narrow(dim, sum(sizes[: axis.rank]), sizes[axis.rank])


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            return _ReduceFrom.apply(g, ctx.axis, False), None
        return all_reduce(g, ctx.axis).wait(), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis, inplace):
        ctx.axis = axis
        y = all_reduce(x, axis, inplace=inplace).wait()
        if y is x:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # the replicated dY feeds each rank's own math: its gradient is summed
            return _CopyTo.apply(g, ctx.axis), None, None
        return g, None, None


class _SplitTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, axis):
        ctx.layout = (dim, sizes, axis)
        return _own_slice(x, dim, sizes, axis).clone()

    @staticmethod
    def backward(ctx, g):
        dim, sizes, axis = ctx.layout
        if torch.is_grad_enabled():
            return _GatherFrom.apply(g, dim, sizes, axis), None, None, None
        return all_gather(g, dim, sizes, axis).wait(), None, None, None


class _GatherFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, axis):
        ctx.layout = (dim, sizes, axis)
        return all_gather(x, dim, sizes, axis).wait()

    @staticmethod
    def backward(ctx, g):
        dim, sizes, axis = ctx.layout
        if torch.is_grad_enabled():
            return _SplitTo.apply(g, dim, sizes, axis), None, None, None
        return _own_slice(g, dim, sizes, axis), None, None, None


class _SequenceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, axis):
        ctx.layout = (dim, sizes, axis)
        return reduce_scatter(x, dim, sizes, axis).wait()

    @staticmethod
    def backward(ctx, g):
        dim, sizes, axis = ctx.layout
        if torch.is_grad_enabled():
            return _SequenceGather.apply(g, dim, sizes, axis), None, None, None
        return all_gather(g, dim, sizes, axis).wait(), None, None, None


class _SequenceGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sizes, axis):
        ctx.layout = (dim, sizes, axis)
        return all_gather(x, dim, sizes, axis).wait()

    @staticmethod
    def backward(ctx, g):
        dim, sizes, axis = ctx.layout
        if torch.is_grad_enabled():
            return _SequenceScatter.apply(g, dim, sizes, axis), None, None, None
        return reduce_scatter(g, dim, sizes, axis).wait(), None, None, None


def copy_to(x: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    """Y = X (replicated); forward none, backward all-reduce of dY (each rank's share of dX summed)."""
    return _CopyTo.apply(x, axis)


def reduce_from(x: torch.Tensor, axis: AxisGroup, *, inplace: bool = False) -> torch.Tensor:
    """Y = Σ_ranks X; forward all-reduce (into x itself with inplace: a fresh tensor nobody else reads), backward
    identity."""
    return _ReduceFrom.apply(x, axis, inplace)


def split_to(x: torch.Tensor, dim: int, sizes, axis: AxisGroup) -> torch.Tensor:
    """Y = this rank's sizes[rank] slice of X along dim; forward none, backward all-gather of dY."""
    return _SplitTo.apply(x, dim % x.dim(), tuple(sizes), axis)


def gather_from(x: torch.Tensor, dim: int, sizes, axis: AxisGroup) -> torch.Tensor:
    """Y = concat_ranks(X) along dim; forward all-gather, backward keeps this rank's slice (no collective)."""
    return _GatherFrom.apply(x, dim % x.dim(), tuple(sizes), axis)


def sequence_scatter(x: torch.Tensor, dim: int, sizes, axis: AxisGroup) -> torch.Tensor:
    """Y = this rank's slice along dim of Σ_ranks X; forward reduce-scatter, backward all-gather."""
    return _SequenceScatter.apply(x, dim % x.dim(), tuple(sizes), axis)


def sequence_gather(x: torch.Tensor, dim: int, sizes, axis: AxisGroup) -> torch.Tensor:
    """Y = concat_ranks(X) along dim; forward all-gather, backward reduce-scatter of dY (the ranks' partial dX)."""
    return _SequenceGather.apply(x, dim % x.dim(), tuple(sizes), axis)
