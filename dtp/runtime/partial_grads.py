"""Partial input gradients that carry their layers' weight-gradient work, so that its reduction overlaps that work.

A column layer that reads a replicated DTensor (the q, k, v or up projections behind a
PrepareModuleInput) hands back its share of dX as a Partial DTensor; autograd sums the readers'
shares and the node where X was made reduces the sum once (an all-reduce, or a reduce-scatter under
sequence parallelism).  Megatron overlaps that collective with the weight-gradient matmuls; so does
dtp: such a layer returns dX first, as a `PartialGrad` carrying its dW / db work, and the reducing
node starts its collective, runs the work, then waits.

- Autograd's sum of two PartialGrads is a local add that merges their work (no DTensor dispatch).
- Any other op that meets a PartialGrad runs its work first and then follows DTensor's semantics.
- A layer defers only when its input comes straight from one of those reducing nodes (`reduced_next`):
  no other node (FSDP's post-backward hook, say) can look at the parameters' gradients before the work ran.
- Work nobody ran by then runs when the backward pass ends (an autograd engine callback), so no
  gradient is ever lost (a backward(inputs=...) that stops short of the reducing node, say).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor._dtensor_spec import DTensorSpec

__all__ = ["PartialGrad", "partial_grad", "run_deferred", "defer", "reducing_node", "reduced_next", "REDUCERS"]

_ADD = torch.ops.aten.add.Tensor
_SUM = (Partial(),)
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback


class Deferred:
    """One piece of gradient work (a callable), run exactly once: by the reducing node, by an op, or at backward's end."""

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


def defer(fn) -> Deferred:
    """fn wrapped to run once, and queued to run at the end of the current backward pass if nobody runs it earlier."""
    work = Deferred(fn)
    _queue_callback(work)
    return work


REDUCERS: set = set()  # the backward node classes of dtp's conversions that reduce a Partial gradient


def reducing_node(fn: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """Register fn (a class decorator) as a conversion whose backward reduces a Partial gradient and runs its work
    (`run_deferred`) while the collective is in flight."""
    REDUCERS.add(fn._backward_cls)
    return fn


def reduced_next(x: torch.Tensor) -> bool:
    """x's gradient goes straight into one of dtp's reducing conversions (nothing else sees it before they run its
    work, FSDP's post-backward hook included): only then may a reader defer work onto it."""
    return type(x.grad_fn) in REDUCERS


class PartialGrad(DTensor):
    """A Partial(sum) gradient DTensor with the deferred work (`Deferred` list) of the layers that produced it."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is _ADD and len(args) == 2 and not kwargs:
            a, b = args
            if (type(a) in (DTensor, PartialGrad) and type(b) in (DTensor, PartialGrad)
                    and (a._spec is b._spec or a._spec == b._spec) and a._spec.placements == _SUM):
                # autograd summing readers' shares: Partial + Partial is the local sum, the work goes along
                return partial_grad(a._local_tensor + b._local_tensor, a._spec,
                                    getattr(a, "_dtp_work", ()) + getattr(b, "_dtp_work", ()))
        for arg in args:
            if type(arg) is PartialGrad:
                run_deferred(arg)
        return super().__torch_dispatch__(func, types, args, kwargs)


def partial_grad(local: torch.Tensor, spec: DTensorSpec, work: tuple = ()) -> DTensor:
    """local as a Partial gradient DTensor with this spec (no communication), carrying `work` (a tuple of Deferred)."""
    grad = DTensor.__new__(PartialGrad, local, spec, requires_grad=False)
    grad._dtp_work = work
    return grad


def run_deferred(grad) -> None:
    """Run the work a PartialGrad carries (once; a no-op for any other gradient)."""
    work = getattr(grad, "_dtp_work", None)
    if work:
        grad._dtp_work = ()
        for item in work:
            item()
