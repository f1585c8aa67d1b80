"""Expert-parallel token dispatch and combine: every (token, expert) pair travels to the rank that holds its expert
by one all-to-all, the local experts run on what arrived, and one all-to-all brings the results back.

    Y_t = Σ_j w_tj · E_{i_tj}(X_t)      (tokens t, their top-k experts i_tj and routing weights w_tj)

Experts are stacked on dim 0 and split over the ep axis in torch.chunk order: rank r holds experts
[r·E/ep, (r+1)·E/ep).  Forward: one all-to-all of the per-expert counts (exchanged so each rank knows what it
receives), one of the tokens, one of the expert outputs; backward: the mirror two (the outputs' gradients out,
the tokens' gradients back).  Uneven splits (any routing, experts with no token, ranks with no token) are exact,
and no token is dropped.  A batch the ranks of a `batch_axis` share (transformers' layout) is sliced over that
axis first (each token dispatched once) and the outputs all-gathered after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dtp.runtime.collectives import AxisGroup, chunk_sizes
from dtp.runtime.mappings import gather_from, split_to

__all__ = ["all_to_all", "Route", "route_tokens", "dispatch", "combine", "expert_parallel"]


def _exchange(x: torch.Tensor, out_sizes: list, in_sizes: list, axis: AxisGroup) -> torch.Tensor:
    """The bare all-to-all: rows [Σin[:r], Σin[:r+1]) of x go to rank r; out_sizes[r] rows come from rank r."""
    x = x.contiguous()
    out = x.new_empty((sum(out_sizes),) + tuple(x.shape[1:]))
    if axis.size == 1:
        return out.copy_(x)
    dist.all_to_all_single(out, x, out_sizes, in_sizes, group=axis.group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_sizes, in_sizes, axis):
        ctx.layout = (out_sizes, in_sizes, axis)
        return _exchange(x, out_sizes, in_sizes, axis)

    @staticmethod
    def backward(ctx, g):
        out_sizes, in_sizes, axis = ctx.layout
        if torch.is_grad_enabled():  # create_graph: the mirror exchange, itself differentiable
            return _AllToAll.apply(g, in_sizes, out_sizes, axis), None, None, None
        return _exchange(g, in_sizes, out_sizes, axis), None, None, None


def all_to_all(x: torch.Tensor, out_sizes, in_sizes, axis: AxisGroup) -> torch.Tensor:
    """Y = the rows every rank sent this one (out_sizes[r] from rank r), X's rows sent in_sizes[r] to rank r;
    forward one all-to-all, backward the mirror all-to-all of dY."""
    return _AllToAll.apply(x, list(out_sizes), list(in_sizes), axis)


@dataclass
class Route:
    """Where this rank's (token, expert) pairs went and what it received: enough to run its experts and undo both."""

    order: torch.Tensor        # the pairs (token-major, k per token) sorted by expert: pair order[i] is sent i-th
    send_sizes: list           # pairs sent to each rank
    recv_sizes: list           # pairs received from each rank
    local_ids: torch.Tensor    # local expert id of every received pair, in arrival order
    num_local: int             # experts on this rank


def route_tokens(top_k_index: torch.Tensor, num_experts: int, axis: AxisGroup) -> Route:
    """Sort this rank's pairs by expert and exchange the per-expert counts: one all-to-all of ep·(E/ep) int64s (plus
    the host read of the split sizes)."""
    num_local = num_experts // axis.size
    ids = top_k_index.reshape(-1).long()
    order = torch.argsort(ids, stable=True)
    send_counts = torch.bincount(ids, minlength=num_experts).view(axis.size, num_local)
    recv_counts = _exchange(send_counts.reshape(-1), [num_local] * axis.size, [num_local] * axis.size, axis)
    recv_counts = recv_counts.view(axis.size, num_local)
    send_sizes, recv_sizes = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
    local_ids = torch.arange(num_local, device=ids.device).repeat(axis.size)
    local_ids = local_ids.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv_sizes))
    return Route(order, send_sizes, recv_sizes, local_ids, num_local)


def dispatch(hidden: torch.Tensor, route: Route, top_k: int, axis: AxisGroup) -> torch.Tensor:
    """The rows this rank's experts run on: X[pair's token] for every pair routed here (one all-to-all; backward
    the mirror all-to-all, then dX summed over each token's pairs)."""
    send = hidden.index_select(0, route.order // top_k)
    return all_to_all(send, route.recv_sizes, route.send_sizes, axis)


def combine(expert_out: torch.Tensor, route: Route, top_k_weights: torch.Tensor, axis: AxisGroup) -> torch.Tensor:
    """Y_t = Σ_j w_tj · out(pair t,j): the experts' outputs back to their tokens' ranks (one all-to-all; backward the
    mirror all-to-all of the outputs' gradients) and weighted by the routing weights."""
    back = all_to_all(expert_out, route.send_sizes, route.recv_sizes, axis)
    pairs = back.index_select(0, torch.argsort(route.order))  # back to (token, slot) order
    pairs = pairs.view(top_k_weights.shape + pairs.shape[-1:])
    return (pairs * top_k_weights.unsqueeze(-1).to(pairs.dtype)).sum(dim=1)


def _own_rows(x: torch.Tensor, batch_axis: AxisGroup | None, differentiable: bool) -> torch.Tensor:
    if batch_axis is None or batch_axis.size == 1:
        return x
    sizes = chunk_sizes(x.shape[0], batch_axis.size)
    if differentiable:
        return split_to(x, 0, sizes, batch_axis)
    return x.narrow(0, sum(sizes[: batch_axis.rank]), sizes[batch_axis.rank])


def expert_parallel(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int,
                    run_local, axis: AxisGroup, batch_axis: AxisGroup | None = None) -> torch.Tensor:
    """Y_t = Σ_j w_tj · E_{i_tj}(X_t) with the experts split over axis (run_local(rows, local_ids) runs this rank's);
    forward 3 all-to-alls (counts, tokens, outputs), backward 2; with batch_axis (a batch its ranks share) each rank
    dispatches its torch.chunk slice of the tokens, forward + 1 all-gather of Y, backward + 2 (dX, dw)."""
    num_tokens = hidden.shape[0]
    hidden = _own_rows(hidden, batch_axis, hidden.requires_grad)
    top_k_index = _own_rows(top_k_index, batch_axis, False)
    top_k_weights = _own_rows(top_k_weights, batch_axis, top_k_weights.requires_grad)
    route = route_tokens(top_k_index, num_experts, axis)
    rows = dispatch(hidden, route, top_k_index.shape[-1], axis)
    if rows.shape[0]:
        out = run_local(rows, route.local_ids)
    else:  # nothing arrived: run on one zero row and keep none, so the parameters still get (zero) gradients
        out = run_local(rows.sum(0, keepdim=True), route.local_ids.new_zeros(1))[:0]
    y = combine(out.to(hidden.dtype), route, top_k_weights, axis)
    if batch_axis is None or batch_axis.size == 1:
        return y
    return gather_from(y.contiguous(), 0, chunk_sizes(num_tokens, batch_axis.size), batch_axis)
