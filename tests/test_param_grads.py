"""Parameter gradients are ordinary DTensors however autograd delivers them: stored by backward (GradDTensor's fast
detach), accumulated over two backwards, returned by torch.autograd.grad, seen by parameter hooks."""

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor

import dtp

from .reference import assert_close


def case_gradients_are_plain_dtensors():
    torch.manual_seed(0)
    single = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(12, 8))
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(),
                                   {"0": dtp.ColwiseParallel(output_layouts=dtp.Replicate()),
                                    "2": dtp.RowwiseParallel(input_layouts=dtp.Replicate())})
    seen = []
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(isinstance(g, DTensor)))
    x = torch.randn(3, 8)
    for _ in range(2):  # the second backward accumulates into the stored gradients
        model(x).pow(2).sum().backward()
        single(x).pow(2).sum().backward()
    for (name, p), ref in zip(model.named_parameters(), single.parameters()):
        assert type(p.grad) is DTensor, f"{name}: .grad is a {type(p.grad).__name__}"
        assert p.grad.placements == p.placements, f"{name}: {p.grad.placements} != {p.placements}"
        assert_close(p.grad.full_tensor(), ref.grad, f"accumulated gradient of {name}")
    assert seen and all(seen)
    grads = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    refs = torch.autograd.grad(single(x).sum(), list(single.parameters()))
    for g, ref in zip(grads, refs):
        assert isinstance(g, DTensor)
        assert_close(g.full_tensor(), ref, "torch.autograd.grad")
    return True


def test_gradients_are_plain_dtensors(pools):
    assert pools.run(2, case_gradients_are_plain_dtensors) == [True, True]


def _mlp_pair(seed=0):
    torch.manual_seed(seed)
    single = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(),
                                   {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()})
    return single, model


def _count_autograd_handoffs():
    """A counter of the parameter gradients autograd delivered itself (GradDTensor's detach in AccumulateGrad)."""
    from dtp.runtime.grads import GradDTensor

    calls = []
    original = GradDTensor.__torch_dispatch__.__func__

    def counting(cls, func, types, args=(), kwargs=None):
        calls.append(str(func))
        return original(cls, func, types, args, kwargs)

    GradDTensor.__torch_dispatch__ = classmethod(counting)
    return calls, lambda: setattr(GradDTensor, "__torch_dispatch__", classmethod(original))


def case_gradients_stored_directly_keep_autograd_semantics():
    single, model = _mlp_pair()
    x = torch.randn(5, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    calls, restore = _count_autograd_handoffs()
    try:
        model(x).pow(2).sum().backward()  # a plain backward: dtp stores every gradient itself
        stored_directly = not calls
        single(x_ref).pow(2).sum().backward()
        for (name, p), ref in zip(model.named_parameters(), single.parameters()):
            assert type(p.grad) is DTensor and p.grad.placements == p.placements, name
            assert_close(p.grad.full_tensor(), ref.grad, f"stored gradient of {name}")
        assert_close(x.grad, x_ref.grad, "input gradient")
        model(x).pow(2).sum().backward()  # accumulates into the stored gradients (through autograd)
        single(x_ref).pow(2).sum().backward()
        for (name, p), ref in zip(model.named_parameters(), single.parameters()):
            assert_close(p.grad.full_tensor(), ref.grad, f"accumulated gradient of {name}")
    finally:
        restore()
    assert stored_directly, f"autograd delivered {len(calls)} parameter gradients of a plain backward"
    params, refs = list(model.parameters()), list(single.parameters())
    for p in params + refs:
        p.grad = None
    model(x).pow(2).sum().backward(inputs=[params[0], params[3]])  # only these two
    single(x_ref).pow(2).sum().backward(inputs=[refs[0], refs[3]])
    assert [p.grad is not None for p in params] == [True, False, False, True]
    assert_close(params[0].grad.full_tensor(), refs[0].grad, "backward(inputs=) weight")
    assert_close(params[3].grad.full_tensor(), refs[3].grad, "backward(inputs=) bias")
    for p in params:
        p.grad = None
    grads = torch.autograd.grad(model(x).pow(2).sum(), params)  # captured, never stored
    assert all(p.grad is None for p in params)
    for g, ref in zip(grads, torch.autograd.grad(single(x_ref).pow(2).sum(), refs)):
        assert_close(g.full_tensor(), ref, "torch.autograd.grad")
    (gx,) = torch.autograd.grad(model(x).pow(2).sum(), [x])  # parameters not asked for: untouched
    assert all(p.grad is None for p in params) and gx.shape == x.shape
    return True


def case_create_graph_hooks_and_reuse():
    single, model = _mlp_pair(1)
    x = torch.randn(5, 8)
    # create_graph (autograd hands the gradients over): the same values, stored by autograd
    params, refs = list(model.parameters()), list(single.parameters())
    model(x).pow(2).sum().backward(create_graph=True)
    single(x).pow(2).sum().backward()
    for (name, p), ref in zip(model.named_parameters(), refs):
        assert_close(p.grad.full_tensor(), ref.grad, f"create_graph gradient of {name}")
    for p in params + refs:
        p.grad = None
    # post-accumulate-grad hooks see the stored gradient (the optimizer-in-backward pattern)
    seen = []
    params[2].register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.full_tensor().clone()))
    model(x).pow(2).sum().backward()
    single(x).pow(2).sum().backward()
    assert len(seen) == 1
    assert_close(seen[0], refs[2].grad, "gradient seen by the post-accumulate hook")
    # one layer used twice in a forward: both uses' gradients are summed
    torch.manual_seed(2)
    lin = nn.Linear(8, 8)
    par = dtp.parallelize_module(copy.deepcopy(lin), dtp.default_mesh(), dtp.ColwiseParallel(output_layouts=dtp.Replicate()))
    par(par(x)).sum().backward()
    lin(lin(x)).sum().backward()
    assert_close(par.weight.grad.full_tensor(), lin.weight.grad, "gradient of a layer used twice")
    assert_close(par.bias.grad.full_tensor(), lin.bias.grad, "bias gradient of a layer used twice")
    return True


def test_gradients_stored_directly_keep_autograd_semantics(pools):
    assert pools.run(2, case_gradients_stored_directly_keep_autograd_semantics) == [True, True]


def test_create_graph_hooks_and_reuse(pools):
    assert pools.run(2, case_create_graph_hooks_and_reuse) == [True, True]
