"""autograd.Function application through torch's C++ entry point, for the eager hot path.

`Function.apply` is a Python wrapper that binds `setup_context` defaults, unwraps tensors left over
from finished functorch transforms and routes calls made inside a transform (vmap, grad, ...) to
functorch; for dtp's functions, outside any transform, all it adds is ~3 µs a call.  `direct_apply`
keeps that wrapper's behaviour (its dead-wrapper unwrapping included) and skips its cost.
"""

from __future__ import annotations

import torch

__all__ = ["direct_apply"]

_transforms_active = torch._C._are_functorch_transforms_active
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def direct_apply(fn: type[torch.autograd.Function]):
    """fn.apply(x, *rest) as torch's C++ apply (x unwrapped if a dead functorch wrapper); inside a functorch
    transform, fn.apply itself.  fn must not define setup_context; only x may be a user's tensor."""
    if fn.setup_context is not torch.autograd.function._SingleLevelFunction.setup_context:
        raise TypeError(f"direct_apply: {fn.__name__} defines setup_context; call {fn.__name__}.apply")
    c_apply = super(torch.autograd.Function, fn).apply  # torch._C._FunctionBase.apply, bound to fn
    wrapped = fn.apply

    def apply(x, *rest):
        if _transforms_active():
            return wrapped(x, *rest)
        return c_apply(_unwrap_if_dead(x), *rest)

    apply.__doc__ = f"{fn.__name__}.apply, through torch's C++ entry point"
    return apply
