"""Cheap differentiable DTensor <-> local tensor conversions for the hot path.

torch's `DTensor.to_local` / `DTensor.from_local` recompute global strides and copy specs on every
backward (~80 µs each, measured); these keep the spec they were given and wrap gradients directly.
Semantics are DTensor's: `to_local(x, grad_placement)` declares how the local gradient is laid out
(e.g. Partial: each rank holds a share to be summed), and `from_local`'s backward brings a gradient
back to the declared placement (Partial -> Replicate is one all-reduce).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

from dtp.runtime.apply import direct_apply
from dtp.runtime.collectives import all_reduce, axis_of
from dtp.runtime.mappings import reduce_from
from dtp.runtime.grads import hand_over, param_grad, reducing_node, run_deferred
from dtp.runtime.sharding import contiguous_stride
from dtp.runtime.traced import replicated_grad_local, traced_as

__all__ = ["to_local", "to_locals", "from_local", "from_local_spec", "replicated_local", "spec_of", "partial_spec"]


_PARTIAL, _REPLICATE = (Partial(),), (Replicate(),)
_SPECS: dict = {}  # (id of mesh or spec, ...) -> (that object, spec): a DTensorSpec costs ~25 µs to build


def _cached(owner, key: tuple, build) -> DTensorSpec:
    hit = _SPECS.get(key)
    if hit is not None and hit[0] is owner:  # the very object (ids are reused only after it died)
        return hit[1]
    if len(_SPECS) > 4096:
        _SPECS.clear()
    spec = build()
    _SPECS[key] = (owner, spec)
    return spec


def spec_of(mesh: DeviceMesh, placement: Placement, shape, dtype) -> DTensorSpec:
    """The DTensor spec of a contiguous tensor of global `shape` laid out as `placement` on a 1-D mesh (cached)."""
    shape = torch.Size(shape)
    return _cached(mesh, (id(mesh), placement, shape, dtype), lambda: DTensorSpec(
        mesh, (placement,), TensorMeta(shape, contiguous_stride(shape), dtype)))


def partial_spec(spec: DTensorSpec) -> DTensorSpec:
    """spec with a Partial placement: how a gradient summed later over the mesh is laid out (cached)."""
    return _with_placement(spec, Partial())


def _with_placement(spec: DTensorSpec, placement: Placement) -> DTensorSpec:
    """spec laid out as placement instead (cached per spec object)."""
    return _cached(spec, (id(spec), placement), lambda: DTensorSpec(spec.mesh, (placement,), spec.tensor_meta))


class _ToLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grad_spec):
        ctx.grad_spec = grad_spec
        ctx.param = x if x.is_leaf else None  # a parameter: its gradient may go straight to param.grad
        local = x._local_tensor
        return local.view_as(local)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # create_graph: the gradient as a differentiable function of g
            return _FromLocal.apply(g, ctx.grad_spec, None), None
        if ctx.param is not None:  # stored directly only if g is ours alone (dtp.runtime.grads.owned)
            return hand_over(ctx.next_functions, 0, g, ctx.param, ctx.grad_spec, fresh=False), None
        return param_grad(g, ctx.grad_spec), None


class _ToLocals(torch.autograd.Function):
    """Several DTensor parameters' local tensors in one autograd node; their gradients keep the parameters' specs."""

    @staticmethod
    def forward(ctx, *params):
        ctx.set_materialize_grads(False)  # a parameter the forward never read keeps grad None
        ctx.params = params
        return tuple(p._local_tensor.view_as(p._local_tensor) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            return tuple(None if g is None else _FromLocal.apply(g, p._spec, None) for g, p in zip(grads, ctx.params))
        edges = ctx.next_functions  # each stored directly only if it is ours alone (dtp.runtime.grads.owned) ...
        seen = [id(g) for g in grads if g is not None]
        shared = {i for i in seen if seen.count(i) > 1} if len(seen) > 1 else ()  # ... and one tensor handed to
        # two parameters (AddBackward passes dY to both) is copied for each, as their two AccumulateGrads would
        return tuple(hand_over(edges, i, g, p, fresh=False) if id(g) not in shared else
                     hand_over(edges, i, g.clone(memory_format=torch.contiguous_format), p)
                     for i, (g, p) in enumerate(zip(grads, ctx.params)))


@reducing_node
class _FromLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, spec, axis):
        ctx.spec, ctx.axis = spec, axis
        return DTensor.__new__(DTensor, local.detach(), spec, requires_grad=False)

    @staticmethod
    def backward(ctx, g):
        if not isinstance(g, DTensor):
            return g, None, None
        have, want = g._spec.placements, ctx.spec.placements
        if torch.is_grad_enabled():  # create_graph: the same conversions, differentiable
            if have == want or (want == _PARTIAL and have == _REPLICATE):
                return _ToLocal.apply(g, g._spec), None, None
            if have == _PARTIAL and want == _REPLICATE:
                return reduce_from(_ToLocal.apply(g, g._spec), ctx.axis or axis_of(ctx.spec.mesh)), None, None
            return _ToLocal.apply(g.redistribute(ctx.spec.mesh, want), ctx.spec), None, None
        if have == want:
            return g._local_tensor, None, None
        if have == _PARTIAL and want == _REPLICATE:
            pending = all_reduce(g._local_tensor, ctx.axis or axis_of(ctx.spec.mesh))  # the one reduction ...
            run_deferred(g)  # ... overlapped with the readers' weight gradients
            return pending.wait(), None, None
        if want == _PARTIAL and have == _REPLICATE:
            return g._local_tensor, None, None  # as torch: a replicated gradient of a Partial input stays as it is
        return g.redistribute(ctx.spec.mesh, want)._local_tensor, None, None


class _ReplicatedLocal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, param, axis):
        ctx.param, ctx.axis = param, axis
        local = param._local_tensor
        return local.view_as(local)

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():
            return _FromLocal.apply(reduce_from(g, ctx.axis), ctx.param._spec, ctx.axis), None
        return hand_over(ctx.next_functions, 0, all_reduce(g, ctx.axis).wait(), ctx.param), None


_to_locals, _from_local = direct_apply(_ToLocals), direct_apply(_FromLocal)


def _traced_to_local(x: DTensor, grad_placement: Placement | None = None) -> torch.Tensor:
    return x.to_local(grad_placements=None if grad_placement is None else (grad_placement,))


@traced_as(_traced_to_local)
def to_local(x: DTensor, grad_placement: Placement | None = None) -> torch.Tensor:
    """x's local tensor; its gradient comes back as a DTensor laid out as grad_placement (default: x's own)."""
    spec = x._spec
    if grad_placement is not None and (grad_placement,) != spec.placements:
        spec = _with_placement(spec, grad_placement)
    return _ToLocal.apply(x, spec)


@traced_as(lambda params: tuple(p.to_local() for p in params))
def to_locals(params) -> tuple:
    """The local tensors of several DTensor parameters (one autograd node); gradients come back laid out as each."""
    return _to_locals(*params)


def _traced_from_local(local: torch.Tensor, mesh: DeviceMesh, placement: Placement, global_shape) -> DTensor:
    shape = torch.Size(global_shape)  # DTensor's own conversion: its backward redistributes as _FromLocal does
    return DTensor.from_local(local, mesh, (placement,), run_check=False, shape=shape, stride=contiguous_stride(shape))


@traced_as(_traced_from_local)
def from_local(local: torch.Tensor, mesh: DeviceMesh, placement: Placement, global_shape) -> DTensor:
    """A DTensor over this rank's local tensor (no communication); backward returns the local gradient, reducing
    a Partial one to the Replicate placement declared here (one all-reduce)."""
    return _from_local(local, spec_of(mesh, placement, global_shape, local.dtype), axis_of(mesh))


def from_local_spec(local: torch.Tensor, spec: DTensorSpec) -> DTensor:
    """from_local with a spec made elsewhere (eager only): a DTensor over this rank's local tensor."""
    return _from_local(local, spec, axis_of(spec.mesh))


@traced_as(lambda param, mesh: replicated_grad_local(param))
def replicated_local(param: DTensor, mesh: DeviceMesh) -> torch.Tensor:
    """The local tensor of a replicated DTensor parameter; backward all-reduces its gradient (Partial -> Replicate)."""
    return _ReplicatedLocal.apply(param, axis_of(mesh))
