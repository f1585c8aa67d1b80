"""The math of embeddings split over the tensor-parallel axis: by vocabulary rows (Shard(0)) or by embedding dim (Shard(1))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from dtp.runtime.collectives import axis_of, chunk_offset, chunk_sizes
from dtp.ops.dtensor_forward import dtensor_forward, wrap_output
from dtp.runtime.mappings import gather_from, reduce_from, sequence_scatter
from dtp.runtime.traced import traced_as
from dtp.runtime.conversions import to_local
from dtp.runtime.local_shards import plain_global_shape
from dtp.runtime.sharding import contiguous_stride, laid_out

__all__ = ["vocab_parallel_embedding", "column_embedding", "check_ids", "replicated_ids", "OwnVocabLookup"]


def replicated_ids(ids, mesh: DeviceMesh, declared: Placement, what: str) -> torch.Tensor:
    """The whole batch of token ids on every rank: a DTensor (or plain ids declared sharded) is all-gathered, as
    torch redistributes an embedding's input to Replicate."""
    if isinstance(ids, torch.Tensor) and not isinstance(ids, DTensor) and not isinstance(declared, Replicate):
        shape = plain_global_shape(ids, mesh, declared, what)  # a plain shard's global shape, asked of every rank
        ids = DTensor.from_local(ids, mesh, [declared], run_check=False, shape=shape,
                                 stride=contiguous_stride(shape))
    return _replicated_ids(ids, what)


def _replicated_ids(ids, what: str) -> torch.Tensor:
    if isinstance(ids, DTensor):
        if not all(isinstance(p, Replicate) for p in ids.placements):
            ids = ids.redistribute(ids.device_mesh, [Replicate()] * ids.device_mesh.ndim)
        ids = ids.to_local()
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{what}: token ids must be an integer tensor, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}")
    return ids


def check_ids(ids: torch.Tensor, vocab: int, what: str) -> None:
    """IndexError (on every rank: the ids are replicated) when an id is outside [0, vocab)."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{what}: token id {bad} is outside the vocabulary [0, {vocab}) "
                             f"(ids range over [{lo}, {hi}])")


def _dtensor_embedding(ids, weight, padding_idx, output_layout, use_local_output, what: str):
    """E[ids] by DTensor's own embedding, for a weight in a layout the split lookups do not read (a `functional_call`
    with replicated parameters, say), as torch's styles compute it; the output redistributed to output_layout."""
    if not isinstance(weight, DTensor):
        raise TypeError(f"{what}: weight must be a DTensor (a parameter of the split model), got a plain "
                        f"{type(weight).__name__} of shape {tuple(weight.shape)}")
    ids = _replicated_ids(ids, what)
    return dtensor_forward(lambda t: F.embedding(t, weight, padding_idx), ids, weight.device_mesh, Replicate(),
                           Replicate(), output_layout, use_local_output, where=what)


def _vocab_rows(ids, weight: DTensor, padding_idx, output_layout, use_local_output, traced: bool):
    """The vocab-parallel lookup; its partial sums reduced by dtp's collectives, or by DTensor's when traced."""
    ids = _replicated_ids(ids, "vocab_parallel_embedding")
    mesh = weight.device_mesh
    vocab, dim = weight.shape
    if traced:  # no data-dependent id check in a graph (torch has none either)
        world, rank = mesh.size(), mesh.get_coordinate()[0]  # get_local_rank is not traceable on torch 2.7
    else:
        axis = axis_of(mesh)
        world, rank = axis.size, axis.rank
        check_ids(ids, vocab, "vocab_parallel_embedding")
    start, rows = chunk_offset(vocab, world, rank), chunk_sizes(vocab, world)[rank]
    w = to_local(weight)
    local_ids = ids - start
    outside = (local_ids < 0) | (local_ids >= rows)
    if rows == 0:  # an empty shard: contributes zeros, keeps a (0, dim) gradient
        partial = w.sum() * 0 + w.new_zeros(ids.shape + (dim,))
    else:
        own_pad = padding_idx - start if padding_idx is not None and 0 <= padding_idx - start < rows else None
        partial = F.embedding(local_ids.masked_fill(outside, 0), w, padding_idx=own_pad)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0)
    layout = output_layout or Replicate()
    if not isinstance(layout, (Replicate, Shard, Partial)):
        raise ValueError(f"vocab_parallel_embedding: output_layout must be Replicate(), Shard(d) or Partial(), "
                         f"got {output_layout!r}")
    if traced:  # the partial sums reduced by DTensor's functional collectives; the weight keeps a Shard(0) gradient
        y = wrap_output(partial, mesh, Partial(), partial.shape)
        y = y if isinstance(layout, Partial) else y.redistribute(mesh, [layout])
        return y.to_local() if use_local_output else y
    if isinstance(layout, Replicate):
        y = reduce_from(partial, axis, inplace=True)
    elif isinstance(layout, Shard):  # any dim, the hidden one included (1-D ids: Shard(1) is the hidden dim)
        dim = layout.dim % partial.dim()
        y = sequence_scatter(partial, dim, chunk_sizes(partial.shape[dim], axis.size), axis)
        layout = Shard(dim)
    else:  # Partial: left for the caller to reduce
        y = partial
    return y if use_local_output else wrap_output(y, mesh, layout, partial.shape)


def _traced_vocab_parallel_embedding(ids, weight: DTensor, *, padding_idx: int | None = None,
                                     output_layout: Placement | None = None, use_local_output: bool = True):
    return _vocab_rows(ids, weight, padding_idx, output_layout, use_local_output, traced=True)


@traced_as(_traced_vocab_parallel_embedding)
def vocab_parallel_embedding(ids, weight: DTensor, *, padding_idx: int | None = None,
                             output_layout: Placement | None = None, use_local_output: bool = True):
    """Y = Σ_ranks E_r[ids] with E split by vocab rows (Shard(0)), ids outside a rank's rows giving 0;
    forward all-reduce (Replicate) or reduce-scatter onto dim d (Shard(d)), backward none (all-gather if scattered)."""
    if not laid_out(weight, Shard(0)):
        return _dtensor_embedding(ids, weight, padding_idx, output_layout or Replicate(), use_local_output,
                                  "vocab_parallel_embedding")
    return _vocab_rows(ids, weight, padding_idx, output_layout, use_local_output, traced=False)


def _traced_column_embedding(ids, weight: DTensor, *, padding_idx: int | None = None, gather_output: bool = False,
                             use_local_output: bool = True):
    ids = _replicated_ids(ids, "column_embedding")  # DTensor's embedding and functional collectives
    return dtensor_forward(lambda t: F.embedding(t, weight, padding_idx), ids, weight.device_mesh, Replicate(),
                           Replicate(), Replicate() if gather_output else Shard(-1), use_local_output)


@traced_as(_traced_column_embedding)
def column_embedding(ids, weight: DTensor, *, padding_idx: int | None = None, gather_output: bool = False,
                     use_local_output: bool = True):
    """Y = E[ids] with E split by embedding dim (Shard(1)); forward all-gather if gather_output, else none."""
    if not laid_out(weight, Shard(1)):
        return _dtensor_embedding(ids, weight, padding_idx, Replicate() if gather_output else Shard(-1),
                                  use_local_output, "column_embedding")
    ids = _replicated_ids(ids, "column_embedding")
    mesh = weight.device_mesh
    check_ids(ids, weight.shape[0], "column_embedding")
    axis = axis_of(mesh)
    y = F.embedding(ids, to_local(weight), padding_idx=padding_idx)
    dim = weight.shape[1]
    if gather_output:
        y = gather_from(y, -1, chunk_sizes(dim, axis.size), axis)
    if use_local_output:
        return y
    return wrap_output(y, mesh, Replicate() if gather_output else Shard(y.dim() - 1), ids.shape + (dim,))


class OwnVocabLookup(TorchFunctionMode):
    """While an nn.Embedding subclass split by vocab rows runs its own forward: F.embedding of its own weight is
    `vocab_parallel_embedding` (all-reduce to Replicate, or reduce-scatter onto `output_layout`) as a DTensor, so the
    subclass's own math after the lookup (a norm, a scale) sees a reduced tensor, never DTensor's pending masked sum."""

    def __init__(self, weight: DTensor, output_layout: Placement | None):
        super().__init__()
        self.weight, self.output_layout = weight, output_layout

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.embedding and len(args) > 1 and args[1] is self.weight:
            extra = dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args[2:]))
            extra.update(kwargs)
            if extra.get("max_norm") is None and not extra.get("scale_grad_by_freq") and not extra.get("sparse"):
                return vocab_parallel_embedding(args[0], self.weight, padding_idx=extra.get("padding_idx"),
                                                output_layout=self.output_layout, use_local_output=False)
        return func(*args, **kwargs)
