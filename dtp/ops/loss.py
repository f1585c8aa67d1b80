"""Cross entropy on logits split over the vocabulary, without gathering the logits."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from dtp.runtime.local_shards import plain_global_shape
from dtp.runtime.mappings import reduce_from
from dtp.runtime.collectives import all_reduce, axis_of, chunk_offset, chunk_sizes
from dtp.runtime.conversions import to_local
from dtp.mesh import tp_submesh
from dtp.runtime.grads import grads_by_recompute

__all__ = ["vocab_parallel_cross_entropy"]


def _token_losses(logits, target, axis, vocab, ignore_index, smoothing, reduce_sums):
    """(per-token loss, the global max, the reduced [Σ exp, z_target, Σ z], target - shard start, mine, valid): the
    loss's math on this rank's logit shard, its sums reduced over the axis by reduce_sums (one all-reduce)."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32 math
    rows = z.shape[-1]
    start = chunk_offset(vocab, axis.size, axis.rank)
    local_max = z.detach().max(-1).values if rows else z.new_full(z.shape[:-1], float("-inf"))
    # stable: shift by the global max (a constant: the loss does not depend on it, so no gradient flows through it)
    shift = all_reduce(local_max, axis, "max", inplace=True).wait().unsqueeze(-1)
    z = z - shift
    e = z.exp()
    valid = target != ignore_index
    t_local = target - start
    mine = valid & (t_local >= 0) & (t_local < rows)
    z_target = (z.gather(-1, t_local.clamp(0, max(rows - 1, 0)).unsqueeze(-1)).squeeze(-1) * mine
                if rows else z.new_zeros(z.shape[:-1]))
    sums = reduce_sums(torch.stack([e.sum(-1), z_target, z.sum(-1)]))
    lse = sums[0].log()
    nll = lse - sums[1]
    loss = (1 - smoothing) * nll + smoothing * (lse - sums[2] / vocab) if smoothing else nll
    return loss * valid, shift, sums, t_local, mine, valid


def _cross_entropy_reference(logits, target, axis, vocab, ignore_index, smoothing):
    """The loss's math in differentiable ops: what its create_graph backward differentiates."""
    return _token_losses(logits, target, axis, vocab, ignore_index, smoothing,
                         lambda t: reduce_from(t, axis, inplace=True))[0]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from local logit shards: fwd all-reduce MAX + one all-reduce SUM, bwd none."""

    @staticmethod
    def forward(ctx, logits, target, axis, vocab, ignore_index, smoothing):
        loss, shift, sums, t_local, mine, valid = _token_losses(
            logits, target, axis, vocab, ignore_index, smoothing, lambda t: all_reduce(t, axis, inplace=True).wait())
        # the logits and two per-token numbers, not the softmax: backward recomputes it (one exp), and a
        # create_graph backward needs the logits themselves
        ctx.save_for_backward(logits, shift, sums[0].unsqueeze(-1), t_local, mine, valid)
        ctx.layout = (target, axis, vocab, ignore_index, smoothing)
        return loss

    @staticmethod
    def backward(ctx, g):
        logits, shift, sum_exp, t_local, mine, valid = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiable gradients (exact second derivatives)
            return grads_by_recompute(_cross_entropy_reference, (logits,) + ctx.layout, (g,), ctx.needs_input_grad)
        _, _, vocab, _, smoothing = ctx.layout
        grad = (logits.to(torch.promote_types(logits.dtype, torch.float32)) - shift).exp_().div_(sum_exp)  # softmax
        if grad.shape[-1]:
            idx = t_local.clamp(0, grad.shape[-1] - 1).unsqueeze(-1)
            grad.scatter_add_(-1, idx, -(1 - smoothing) * mine.to(grad.dtype).unsqueeze(-1))
        if smoothing:
            grad -= smoothing / vocab
        grad *= (g * valid).unsqueeze(-1)
        return grad.to(logits.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits, target, *, device_mesh: DeviceMesh | None = None,
                                 vocab_size: int | None = None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy(full_logits.flatten(0, -2), target.flatten()) from vocab-sharded logits (Shard(-1)); forward one all-reduce MAX and one SUM, backward none.

    logits: a DTensor sharded on its last dim, or this rank's plain shard with `device_mesh` (the
    vocabulary then is `vocab_size`, or the ranks' widths summed: one all-gather of 9 ints).  target: the
    replicated class ids, shape logits.shape[:-1].  Returns a plain tensor, like F.cross_entropy.
    """
    if isinstance(logits, DTensor):
        if len(logits.placements) != 1 or not (isinstance(logits.placements[0], Shard)
                                               and logits.placements[0].dim % logits.dim() == logits.dim() - 1):
            raise ValueError(f"vocab_parallel_cross_entropy: logits must be sharded on the vocab (last) dim, "
                             f"got placements {logits.placements}")
        mesh, vocab, local = logits.device_mesh, logits.shape[-1], to_local(logits)
    else:
        mesh = tp_submesh(device_mesh, "vocab_parallel_cross_entropy")
        local = logits
        vocab = vocab_size if vocab_size is not None else plain_global_shape(  # every rank's width: uneven is exact
            local, mesh, Shard(-1), "vocab_parallel_cross_entropy")[-1]
    axis = axis_of(mesh)
    if isinstance(target, DTensor):
        if not all(isinstance(p, Replicate) for p in target.placements):
            raise ValueError(f"vocab_parallel_cross_entropy: target must be replicated, got {target.placements}")
        target = target.to_local()
    if local.shape[-1] != chunk_sizes(vocab, axis.size)[axis.rank]:
        raise ValueError(f"vocab_parallel_cross_entropy: rank {axis.rank} holds {local.shape[-1]} logits per token, "
                         f"but a vocabulary of {vocab} over {axis.size} ranks gives it "
                         f"{chunk_sizes(vocab, axis.size)[axis.rank]}")
    if tuple(target.shape) != tuple(local.shape[:-1]):
        raise ValueError(f"vocab_parallel_cross_entropy: target shape {tuple(target.shape)} must equal the logits' "
                         f"leading shape {tuple(local.shape[:-1])}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vocab_parallel_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    checked = target[target != ignore_index]
    if checked.numel() and (int(checked.min()) < 0 or int(checked.max()) >= vocab):
        raise IndexError(f"vocab_parallel_cross_entropy: target ids must lie in [0, {vocab}) or equal "
                         f"ignore_index={ignore_index}; got values in [{int(checked.min())}, {int(checked.max())}]")
    loss = _VocabParallelCrossEntropy.apply(local, target, axis, vocab, ignore_index, float(label_smoothing))
    if reduction == "none":
        return loss.to(local.dtype)
    total = loss.sum()
    if reduction == "sum":
        return total.to(local.dtype)
    return (total / (target != ignore_index).sum()).to(local.dtype)
