"""Parameter gradients handed over as DTensors laid out like their parameters, at plain-tensor cost, by
AccumulateGrad's rules.

When autograd would do nothing but store or add a parameter's gradient (a leaf without hooks, a
plain backward that reaches it, no create_graph), `hand_over` does it itself and gives autograd
nothing for it: AccumulateGrad's `grad.detach()` goes through DTensor's op dispatch (measured ~12 µs
a parameter on torch 2.13, ~40 µs on 2.7, per backward).  It follows AccumulateGrad: the gradient
is cast to `param.grad_dtype` (torch >= 2.14; FSDP2's reduce_dtype), stored when `.grad` is None
and otherwise added in place, so a reference held to `.grad` sees the update.  Otherwise the
gradient goes through autograd as a `GradDTensor`, whose detach is a plain DTensor over the same
local tensor, so hooks, `autograd.grad` and `backward(inputs=...)` behave exactly as for any
parameter.  Under create_graph, nodes compute their gradients by `grads_by_recompute`: their own
math again in differentiable ops, so second derivatives are exact.

Not visible from Python, hence not seen: hooks registered on a parameter's AccumulateGrad node
itself (`get_gradient_edge(p).node.register_hook`); use `p.register_post_accumulate_grad_hook`.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec

from dtp.runtime.traced import is_compiling

__all__ = ["GradDTensor", "param_grad", "hand_over", "plain_leaf", "store_grad", "grad_dtype_of", "grads_by_recompute"]

_DETACH = torch.ops.aten.detach.default
# torch internals the direct store relies on, probed once: without them every gradient goes through autograd
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)
_WILL_EXECUTE_KNOWN = _will_execute is not None and hasattr(torch.Tensor, "_post_accumulate_grad_hooks")
_HAS_GRAD_DTYPE = hasattr(torch.Tensor, "grad_dtype")  # torch >= 2.14: AccumulateGrad casts to param.grad_dtype


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


def plain_leaf(edges: tuple, index: int, param: torch.Tensor) -> bool:
    """The node's input `index` (edges: its ctx.next_functions), param, is a leaf without hooks whose AccumulateGrad runs
    in this plain backward (no create_graph, not traced): autograd would only store or add its gradient."""
    if not (_WILL_EXECUTE_KNOWN and param.is_leaf and param._post_accumulate_grad_hooks is None
            and not param._backward_hooks and not torch.is_grad_enabled() and not is_compiling()):
        return False
    try:  # False where backward(inputs=...) leaves param out; raises where autograd.grad captures it
        return _will_execute(edges[index][0])
    except RuntimeError:
        return False


def hand_over(edges: tuple, index: int, local: torch.Tensor | None, param: DTensor, spec: DTensorSpec | None = None,
              dtype: torch.dtype | None = None):
    """The gradient of the node's input `index` (edges: its ctx.next_functions), DTensor parameter `param`, from its
    freshly computed local shard (nobody else holds it), laid out as spec (default: param's own) (no communication):
    stored or accumulated in param.grad as AccumulateGrad would when that is all autograd would do (then returns
    None), else returned as a GradDTensor for autograd to deliver."""
    if local is None:
        return None
    if not plain_leaf(edges, index, param):
        return param_grad(local, param._spec if spec is None else spec, dtype)
    store_grad(param, local, spec, dtype)
    return None


def grad_dtype_of(param: torch.Tensor, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype AccumulateGrad gives param's gradient: param.grad_dtype where torch has it (>= 2.14; FSDP2 sets it to
    its reduce_dtype), else `default` (the parameter's dtype, as autograd casts a node's gradient to its input's)."""
    if _HAS_GRAD_DTYPE:
        want = param.grad_dtype
        return want if want is not None else default
    return default


def store_grad(param: DTensor, local: torch.Tensor | None, spec: DTensorSpec | None = None,
               dtype: torch.dtype | None = None) -> None:
    """What AccumulateGrad does for a plain leaf in a plain backward, for a freshly computed local gradient: cast to
    param's grad dtype, then param.grad = its DTensor (laid out as spec, default param's) or, if a gradient is already
    there, added to it in place (a reference held to param.grad sees the sum)."""
    if local is None:
        return
    spec = param._spec if spec is None else spec
    want = grad_dtype_of(param, dtype)
    if want is not None and local.dtype != want:
        local = local.to(want)
    old = param.grad
    if old is None:
        param.grad = DTensor.__new__(DTensor, local.contiguous(), spec, requires_grad=False)
    elif type(old) is DTensor and (old._spec is spec or old._spec == spec):
        old._local_tensor.add_(local)
    else:  # another layout (or a subclass): DTensor's own in-place add
        old.add_(DTensor.__new__(DTensor, local.contiguous(), spec, requires_grad=False))


def grads_by_recompute(reference, inputs: tuple, grads: tuple, needs: tuple) -> tuple:
    """For a backward under create_graph (grad mode on): the gradients of reference(*inputs), the node's own math
    written in differentiable ops, as autograd.grad gives them with create_graph, so that they are functions of the
    inputs and of the incoming gradients and their own gradients (a gradient penalty, gradgradcheck) are exact."""
    wrt = [i for i, (t, need) in enumerate(zip(inputs, needs))
           if need and isinstance(t, torch.Tensor) and t.requires_grad]
    result = [None] * len(inputs)
    if not wrt:
        return tuple(result)
    with torch.enable_grad():
        outs = reference(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    if pairs:
        got = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wrt], [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
        for i, g in zip(wrt, got):
            result[i] = g
    return tuple(result)
