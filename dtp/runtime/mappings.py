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


def _slice_copy(x, dim, sizes, axis):
    return _own_slice(x, dim, sizes, axis).clone()


def _gathered(x, dim, sizes, axis):
    return all_gather(x, dim, sizes, axis).wait()


def _scattered(x, dim, sizes, axis):
    return reduce_scatter(x, dim, sizes, axis).wait()


def _along_dim(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd function Y = forward(X, dim, sizes, axis) whose backward is backward(dY, dim, sizes, axis), or,
    under create_graph, its partner's autograd function (`.partner`, the adjoint), so second derivatives are exact."""
    def forward_(ctx, x, dim, sizes, axis):
        ctx.layout = (dim, sizes, axis)
        return forward(x, dim, sizes, axis)

    def backward_(ctx, g):
        if torch.is_grad_enabled():
            return fn.partner.apply(g, *ctx.layout), None, None, None
        return backward(g, *ctx.layout), None, None, None

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_), "backward": staticmethod(backward_)})
    return fn


_SplitTo = _along_dim("_SplitTo", _slice_copy, _gathered)
_GatherFrom = _along_dim("_GatherFrom", _gathered, _own_slice)
_SequenceScatter = _along_dim("_SequenceScatter", _scattered, _gathered)
_SequenceGather = _along_dim("_SequenceGather", _gathered, _scattered)
_SplitTo.partner, _GatherFrom.partner = _GatherFrom, _SplitTo
_SequenceScatter.partner, _SequenceGather.partner = _SequenceGather, _SequenceScatter


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
