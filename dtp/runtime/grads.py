"""Gradient delivery, in one place: how a gradient computed by one of dtp's autograd nodes reaches `.grad`.

1. By AccumulateGrad's rules.  When autograd would do nothing but store or add a parameter's gradient (a
   leaf without hooks, a plain backward that reaches it, no create_graph), `hand_over` does it itself and
   gives autograd nothing for it: AccumulateGrad's `grad.detach()` goes through DTensor's op dispatch
   (~12 µs a parameter on torch 2.13, ~40 µs on 2.7).  As AccumulateGrad, it casts to `param.grad_dtype`
   (torch >= 2.14; FSDP2's reduce_dtype), stores when `.grad` is None and otherwise adds in place, so a
   reference held to `.grad` sees the update.  Otherwise the gradient goes through autograd as a
   `GradDTensor` (a detach without DTensor dispatch), so hooks, `autograd.grad` and `backward(inputs=)`
   behave as for any parameter.  The torch internals this relies on are probed once; without them every
   gradient takes autograd's path.
2. Deferred weight gradients.  A column layer that reads a replicated DTensor hands back its share of dX
   as a `PartialGrad` carrying its dW / db work; autograd sums the readers' shares with a local add, and the
   node where X was made (a `reducing_node`) starts the one all-reduce (a reduce-scatter under SP), runs
   the work, then waits: Megatron's overlap.  A layer defers only on more than one rank (on one there is nothing to
   overlap) and only when its dX goes straight into such a node (`reduced_next`), so nothing (FSDP's post-backward
   hook, say) reads `.grad` before the work ran; any other op meeting a PartialGrad runs the work first, and work
   nobody ran runs when the backward pass ends.
3. Under create_graph every node computes its gradients by `grads_by_recompute`: its own math again in
   differentiable ops (dtp.runtime.mappings), so second derivatives are exact.

Not visible from Python, hence not seen: hooks on a parameter's AccumulateGrad node itself
(`get_gradient_edge(p).node.register_hook`); use `p.register_post_accumulate_grad_hook`.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Partial
from torch.distributed.tensor._dtensor_spec import DTensorSpec

__all__ = ["GradDTensor", "param_grad", "hand_over", "owned", "plain_leaf", "store_grad", "grad_dtype_of", "node_param_grads",
           "PartialGrad", "partial_grad", "run_deferred", "defer", "reducing_node", "reduced_next", "grads_by_recompute"]

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
    in this plain backward (no create_graph): autograd would only store or add its gradient."""
    if not (_WILL_EXECUTE_KNOWN and param.is_leaf and param._post_accumulate_grad_hooks is None
            and not param._backward_hooks and not torch.is_grad_enabled()):
        return False
    try:  # False where backward(inputs=...) leaves param out; raises where autograd.grad captures it
        return _will_execute(edges[index][0])
    except RuntimeError:
        return False


def owned(g: torch.Tensor) -> bool:
    """Nobody but this backward holds g (no other gradient or hook shares it), AccumulateGrad's own test for keeping
    a gradient without a copy (a view counts as its own tensor there too: a norm's summed gradient is a view of its
    reduction); False where torch does not expose use counts."""
    return _OWNED_COUNT is not None and g._use_count() <= _OWNED_COUNT


def _measure_owned_count():
    """The use count of a gradient nobody else holds, as a backward sees it (one tiny backward, at import)."""
    if not hasattr(torch.Tensor, "_use_count"):
        return None
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            seen.append(g._use_count())
            return None

    with torch.enable_grad():
        (Probe.apply(torch.ones(2, requires_grad=True)) * 2).sum().backward()
    return seen[0] if seen else None


_OWNED_COUNT = _measure_owned_count()


def hand_over(edges: tuple, index: int, local: torch.Tensor | None, param: DTensor, spec: DTensorSpec | None = None,
              dtype: torch.dtype | None = None, fresh: bool = True):
    """The gradient of the node's input `index` (edges: its ctx.next_functions), DTensor parameter `param`, from its
    local shard (fresh: computed by the node, nobody else holds it; else checked with `owned` and copied if shared),
    laid out as spec (default: param's own) (no communication): stored or accumulated in param.grad as AccumulateGrad
    would when that is all autograd would do (then returns None), else returned as a GradDTensor for autograd."""
    if local is None:
        return None
    if not (fresh or owned(local)):  # shared (two parameters' gradients, a view): a copy, as AccumulateGrad makes;
        local = local.clone(memory_format=torch.contiguous_format)  # a DTensor wrapper would hide the sharing from it
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


def node_param_grads(ctx, needs: tuple, weight: DTensor, bias: DTensor | None, compute, carry: list | None = None):
    """The node's (dW, db) return values from compute() -> (local dW or None, local db or None) (no communication):
    stored as autograd would where that is all it would do, else returned; with a `carry` list and both plain
    leaves, compute and store are deferred (a `Deferred` appended to carry) and both returned values are None."""
    need_w, need_b = needs[1], bias is not None and needs[2]
    if not (need_w or need_b):
        return None, None
    edges = ctx.next_functions
    if (carry is not None and _queue_callback is not None and (not need_w or plain_leaf(edges, 1, weight))
            and (not need_b or plain_leaf(edges, 2, bias))):
        def work():
            grad_w, grad_b = compute()
            store_grad(weight, grad_w, dtype=weight.dtype)
            if bias is not None:
                store_grad(bias, grad_b, dtype=bias.dtype)

        carry.append(defer(work))
        return None, None
    grad_w, grad_b = compute()
    return (hand_over(edges, 1, grad_w, weight, dtype=weight.dtype),
            hand_over(edges, 2, grad_b, bias, dtype=bias.dtype) if need_b else None)


_ADD = torch.ops.aten.add.Tensor
_SUM = (Partial(),)
_queue_callback = getattr(getattr(torch.autograd.Variable, "_execution_engine", None), "queue_callback", None)



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
