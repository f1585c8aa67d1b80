"""Embeddings split over the tensor-parallel axis: by vocabulary rows (Shard(0)) or by embedding dim (Shard(1))."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard

from .collectives import axis_of, chunk_offset, chunk_sizes
from .functional import dtensor_forward, wrap_output
from .mesh import tp_submesh
from .params import shard_parameter
from .autograd_collectives import gather_from, reduce_from, sequence_scatter
from .traceable import is_compiling
from .dtensor_conversions import to_local

__all__ = ["vocab_parallel_embedding", "column_embedding", "VocabParallelEmbedding", "check_ids", "replicated_ids"]


def replicated_ids(ids, mesh: DeviceMesh, declared: Placement, what: str) -> torch.Tensor:
    """The whole batch of token ids on every rank: a DTensor (or plain ids declared sharded) is all-gathered, as
    torch redistributes an embedding's input to Replicate."""
    if isinstance(ids, torch.Tensor) and not isinstance(ids, DTensor) and not isinstance(declared, Replicate):
        ids = DTensor.from_local(ids, mesh, [declared], run_check=False)
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


def vocab_parallel_embedding(ids, weight: DTensor, *, padding_idx: int | None = None,
                             output_layout: Placement | None = None, use_local_output: bool = True):
    """Y = Σ_ranks E_r[ids] with E split by vocab rows (Shard(0)), ids outside a rank's rows giving 0;
    forward all-reduce (Replicate) or reduce-scatter onto dim d (Shard(d)), backward none (all-gather if scattered)."""
    ids = _replicated_ids(ids, "vocab_parallel_embedding")
    mesh = weight.device_mesh
    vocab, dim = weight.shape
    traced = is_compiling()
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


def column_embedding(ids, weight: DTensor, *, padding_idx: int | None = None, gather_output: bool = False,
                     use_local_output: bool = True):
    """Y = E[ids] with E split by embedding dim (Shard(1)); forward all-gather if gather_output, else none."""
    ids = _replicated_ids(ids, "column_embedding")
    mesh = weight.device_mesh
    if is_compiling():  # traced: DTensor's embedding and functional collectives (torch's semantics)
        return dtensor_forward(lambda t: F.embedding(t, weight, padding_idx), ids, mesh, Replicate(), Replicate(),
                               Replicate() if gather_output else Shard(-1), use_local_output)
    check_ids(ids, weight.shape[0], "column_embedding")
    axis = axis_of(mesh)
    y = F.embedding(ids, to_local(weight), padding_idx=padding_idx)
    dim = weight.shape[1]
    if gather_output:
        y = gather_from(y, -1, chunk_sizes(dim, axis.size), axis)
    if use_local_output:
        return y
    return wrap_output(y, mesh, Replicate() if gather_output else Shard(y.dim() - 1), ids.shape + (dim,))


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with its rows split over the vocab (Shard(0)); forward all-reduce (or reduce-scatter onto Shard(1))."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 device_mesh: DeviceMesh | None = None, output_layout: Placement | None = None,
                 use_local_output: bool = True, _weight: torch.Tensor | None = None, device=None, dtype=None):
        super().__init__()
        # the full table drawn as nn.Embedding draws it (same values per seed), then sliced locally
        full = nn.Embedding(num_embeddings, embedding_dim, padding_idx, _weight=_weight, device=device, dtype=dtype)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, full.padding_idx
        self.device_mesh = tp_submesh(device_mesh, "VocabParallelEmbedding")
        self.output_layout = output_layout or Replicate()
        self.use_local_output = use_local_output
        self.weight = shard_parameter(full.weight, self.device_mesh, Shard(0))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, device_mesh: DeviceMesh | None = None, **kwargs):
        """A vocab-parallel copy of an nn.Embedding: each rank keeps its rows."""
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                   device_mesh=device_mesh, _weight=embedding.weight.detach(), **kwargs)

    def forward(self, ids):
        return vocab_parallel_embedding(ids, self.weight, padding_idx=self.padding_idx,
                                        output_layout=self.output_layout, use_local_output=self.use_local_output)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"tp={self.device_mesh.size()}, output_layout={self.output_layout}")
