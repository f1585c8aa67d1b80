"""What dtp runs while torch.compile traces a model: DTensor's own ops, whose collectives are torch's traceable
functional collectives, instead of the eager fast path's c10d calls (`async_op=True` work handles, which Dynamo
cannot put in a graph).  `traced_as` is the one place where that choice is made: each eager entry point names its
traced twin with it.

The math and the placements are the eager path's: a Column layer is F.linear on a replicated input
and a Shard(0) weight, a Row layer F.linear on a Shard(-1) input and a Shard(1) weight, an SP norm
the module's own forward on a Shard(seq) DTensor; the compiled graph holds plain aten ops and
functional collectives, and the DTensor bookkeeping is paid once, at trace time.
"""

from __future__ import annotations

import functools

import torch
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate

__all__ = ["traced_as", "is_compiling", "module_forward_on_dtensors", "replicated_grad_local"]

is_compiling = torch.compiler.is_compiling  # True while Dynamo traces (a constant in the graph); ~90 ns in eager


def traced_as(traced):
    """Decorator: the function runs as itself in eager and as `traced` (same signature: DTensor's ops, functional
    collectives) while torch.compile traces; the only place dtp chooses between its eager and compiled paths."""
    def decorate(eager):
        @functools.wraps(eager)
        def choose(*args, **kwargs):
            if is_compiling():
                return traced(*args, **kwargs)
            return eager(*args, **kwargs)

        choose.eager, choose.traced = eager, traced
        return choose

    return decorate


def _to_dtensor(value, mesh, placement: Placement):
    if isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
        return DTensor.from_local(value, mesh, [placement], run_check=False)
    return value


def _to_local(value):
    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, tuple):
        return tuple(_to_local(v) for v in value)
    return value


def module_forward_on_dtensors(module, mesh, args, kwargs, placement: Placement = Replicate(), local_output=True):
    """module's own forward with plain tensor inputs taken as `placement` DTensors on mesh (no collective for
    Replicate); plain outputs back if local_output.  The traced form of running on local parameters."""
    args = tuple(_to_dtensor(a, mesh, placement) for a in args)
    kwargs = {k: _to_dtensor(v, mesh, placement) for k, v in kwargs.items()}
    out = type(module).forward(module, *args, **kwargs)
    return _to_local(out) if local_output else out


def replicated_grad_local(param: DTensor) -> torch.Tensor:
    """A replicated parameter's local tensor whose gradient is summed over the mesh (Partial -> Replicate, one
    all-reduce in backward): the traced form of dtp.runtime.conversions.replicated_local."""
    return param.redistribute(param.device_mesh, param.placements).to_local(grad_placements=[Partial()])
