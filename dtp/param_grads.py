"""Parameter gradients handed to autograd as DTensors laid out like their parameters, at plain-tensor cost.

Autograd's AccumulateGrad stores `grad.detach()` in `param.grad`; on a DTensor that detach goes
through DTensor's op dispatch (measured ~10 µs a parameter on torch 2.13, ~45 µs on 2.7, per
backward).  A `GradDTensor` answers that one op itself with a plain DTensor over the same local
tensor, so `param.grad` is an ordinary DTensor and every other op is DTensor's own.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec

__all__ = ["GradDTensor", "param_grad"]

_DETACH = torch.ops.aten.detach.default


class GradDTensor(DTensor):
    """A DTensor gradient on its way to AccumulateGrad: its detach is a plain DTensor over the same local tensor."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is _DETACH:
            return DTensor.__new__(DTensor, args[0]._local_tensor.detach(), args[0]._spec, requires_grad=False)
        return super().__torch_dispatch__(func, types, args, kwargs)


def param_grad(local: torch.Tensor | None, spec: DTensorSpec, dtype: torch.dtype | None = None):
    """local (cast to dtype if given) as a gradient DTensor with this spec (no communication); None stays None."""
    if local is None:
        return None
    if dtype is not None and local.dtype != dtype:
        local = local.to(dtype)
    # DTensor.__new__ alone: DTensor.__init__ only adds a dynamo-disabling wrapper (~1.5 µs a call)
    return DTensor.__new__(GradDTensor, local.contiguous(), spec, requires_grad=False)
