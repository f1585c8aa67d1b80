"""Sequence parallelism: run a module (norm, dropout, ...) on this rank's slice of the sequence.

The module's parameters become replicated DTensors; during forward they are swapped for their
local tensors, whose gradients come back as Partial DTensors, as torch's SequenceParallel leaves
them: each rank saw only its tokens, and the sum over ranks happens where the gradient is read
(DTensor's optimizer ops, clip_grad_norm_, FSDP2's reduction, full_tensor), so a norm weight is
never updated from one rank's tokens alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Shard

from dtp.ops.dtensor_forward import wrap_output
from dtp.ops.local_forward import local_parameters
from dtp.runtime.traced import module_forward_on_dtensors, traced_as
from dtp.runtime.conversions import from_local_spec, to_local
from dtp.runtime.local_shards import guessed_spec, is_guessed

__all__ = ["sequence_shard_of", "run_on_sequence_shard", "sequence_parallel_forward"]


def sequence_shard_of(x, mesh: DeviceMesh, seq_dim: int, what: str):
    """(this rank's sequence shard of x, x's global shape); a DTensor in another layout is redistributed (torch's
    semantics); a plain tensor is taken as an even shard, as torch does (a guess: see dtp.runtime.local_shards)."""
    if isinstance(x, DTensor):
        seq = seq_dim % x.dim()
        if x.placements != (Shard(seq),):  # any layout, as torch: Replicate keeps our slice, Partial reduce-scatters,
            x = x.redistribute(mesh, [Shard(seq)])  # another shard dim is all-to-all'ed
        return to_local(x), tuple(x.shape)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: input must be a tensor, got {type(x).__name__}")
    shape = list(x.shape)
    shape[seq_dim % x.dim()] *= mesh.size()
    return x, tuple(shape)


def run_on_sequence_shard(module: nn.Module, x_local: torch.Tensor, args, kwargs):
    """module's own forward on local tensors; its replicated parameters' gradients come back Partial (each rank's
    share from its own tokens), as torch's SequenceParallel leaves them: whoever reads them reduces them (DTensor's
    optimizer step, clip_grad_norm_, FSDP2, full_tensor), no collective in backward."""
    with local_parameters(module, lambda p: to_local(p, Partial())):
        return type(module).forward(module, x_local, *args, **kwargs)


def _traced_sequence_parallel_forward(module: nn.Module, x, *args, **kwargs):
    style, mesh = module._dtp_style, module._dtp_mesh  # the module's forward on the Shard(seq) DTensor, as torch's
    seq = Shard(style.sequence_dim % x.dim())
    if isinstance(x, DTensor) and x.placements != (seq,):
        x = x.redistribute(mesh, [seq])
    return module_forward_on_dtensors(module, mesh, (x,) + args, kwargs, seq, style.use_local_output)


@traced_as(_traced_sequence_parallel_forward)
def sequence_parallel_forward(module: nn.Module, x, *args, **kwargs):
    """Forward of a module under SequenceParallel: local math on the sequence shard, no activation collective."""
    style = module._dtp_style
    mesh = module._dtp_mesh
    guessed = not isinstance(x, DTensor) or is_guessed(x)  # the global length of a plain shard is torch's guess
    x_local, global_shape = sequence_shard_of(x, mesh, style.sequence_dim, f"SequenceParallel({module._dtp_path!r})")
    y = run_on_sequence_shard(module, x_local, args, kwargs)
    if style.use_local_output or not isinstance(y, torch.Tensor):
        return y
    seq = style.sequence_dim % y.dim()
    shape = list(y.shape)
    shape[seq] = global_shape[seq]
    if guessed and mesh.size() > 1:  # marked: the dtp collective that reads it learns every rank's length
        return from_local_spec(y, guessed_spec(mesh, Shard(seq), shape, y.dtype))
    return wrap_output(y, mesh, Shard(seq), shape)
