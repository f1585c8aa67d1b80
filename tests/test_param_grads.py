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
