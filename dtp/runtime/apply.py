"""autograd.Function application through torch's C++ entry point, for the eager hot path.

`Function.apply` is a Python wrapper that binds `setup_context` defaults, unwraps tensors left over
from finished functorch transforms and routes calls made inside a transform (vmap, grad, ...) to
functorch; for dtp's functions, outside any transform, all it adds is ~3 µs a call.  `direct_apply`
keeps that wrapper's behaviour (its dead-wrapper unwrapping included) and skips its cost.
"""

from __future__ import annotations

import torch

__all__ = ["direct_apply"]

# the torch internals this relies on, probed once; without any of them direct_apply is plain fn.apply
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
DIRECT = (_transforms_active is not None and _unwrap_if_dead is not None
          and hasattr(getattr(torch._C, "_FunctionBase", None), "apply"))


def direct_apply(fn: type[torch.autograd.Function]):
    """fn.apply(x, *rest) as torch's C++ apply (x unwrapped if a dead functorch wrapper); inside a functorch
    transform, or on a torch without those entry points, fn.apply itself.  fn must not define setup_context; only x
    may be a user's tensor."""
    if fn.setup_context is not torch.autograd.function._SingleLevelFunction.setup_context:
        raise TypeError(f"direct_apply: {fn.__name__} defines setup_context; call {fn.__name__}.apply")
    wrapped = fn.apply
    if not DIRECT:
        return wrapped
    c_apply = super(torch.autograd.Function, fn).apply  # torch._C._FunctionBase.apply, bound to fn

    def apply(x, *rest):
        if _transforms_active():
            return wrapped(x, *rest)
        return c_apply(_unwrap_if_dead(x), *rest)

    apply.__doc__ = f"{fn.__name__}.apply, through torch's C++ entry point"
    return apply
