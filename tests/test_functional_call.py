"""`torch.func.functional_call` on a split model with parameters in another layout than the plan's (every one
replicated) gives one process's logits and gradients, as torch's TP does; the split layers then take DTensor's own
path instead of reading the parameters' local tensors as shards.  Plain (undistributed) parameters get a clear error,
never a wrong number."""

import copy

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
from torch.distributed.tensor import DTensor, Replicate
from torch.func import functional_call

import dtp
from examples.gpt import GPT, GPTConfig, tp_plan

from .reference import assert_close, full


def _split(single, styles, sp):
    model = copy.deepcopy(single)
    parallelize = dtp.parallelize_module if styles is dtp else torch_tp.parallelize_module
    return parallelize(model, dtp.default_mesh(), tp_plan(sp, styles=styles))


def _replicated(model) -> dict:
    return {n: (p.detach().redistribute(p.device_mesh, [Replicate()]) if isinstance(p, DTensor) else p.detach())
            .requires_grad_() for n, p in model.named_parameters()}


def case_replicated_parameters(sp):
    torch.manual_seed(0)
    single = GPT(GPTConfig(n_layers=1))
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = single(ids)
    names = [n for n, _ in single.named_parameters()]
    ref_grads = torch.autograd.grad(ref.pow(2).mean(), list(single.parameters()))
    for styles in (dtp, torch_tp):
        model = _split(single, styles, sp)
        params = _replicated(model)
        logits = full(functional_call(model, params, (ids,)))
        assert_close(logits, ref, f"{styles.__name__}: logits")
        grads = torch.autograd.grad(logits.pow(2).mean(), [params[n] for n in names])
        for name, g, r in zip(names, grads, ref_grads):
            assert_close(full(g), r, f"{styles.__name__}: gradient of {name}")
        own = full(functional_call(model, dict(model.named_parameters()), (ids,)))  # its own parameters: its own result
        assert_close(own, ref, f"{styles.__name__}: logits with the model's own parameters")
    return True


@pytest.mark.parametrize("sp", [False, True])
def test_functional_call_with_replicated_parameters(pools, sp):
    assert pools.run(2, case_replicated_parameters, sp) == [True, True]


def case_plain_parameters():
    torch.manual_seed(0)
    single = GPT(GPTConfig(n_layers=1))
    model = _split(single, dtp, False)
    ids = torch.randint(0, 96, (2, 8))
    try:
        functional_call(model, {n: p.detach() for n, p in single.named_parameters()}, (ids,))
    except (TypeError, RuntimeError) as e:
        return str(e)
    return "no error"


def test_functional_call_with_plain_parameters_is_refused(pools):
    for message in pools.run(2, case_plain_parameters):
        assert "DTensor" in message, message


def case_expert_parameters_in_another_layout():
    """Experts compute on this rank's shard of their own weights: replicated ones are refused by name (not run as
    if they were this rank's experts, which gave wrong logits); the model's own parameters give its own result."""
    from tests.moe_model import MoEModel, ep_plan

    torch.manual_seed(0)
    single = MoEModel(num_experts=4, top_k=2, layers=1)
    model = dtp.parallelize_module(copy.deepcopy(single), dtp.default_mesh(), ep_plan(input_layouts=Replicate()))
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    assert_close(full(functional_call(model, dict(model.named_parameters()), (ids,))), single(ids), "own parameters")
    try:
        functional_call(model, _replicated(model), (ids,))
    except ValueError as e:
        return str(e)
    return "no error"


def test_expert_parameters_in_another_layout_are_refused(pools):
    for message in pools.run(2, case_expert_parameters_in_another_layout):
        assert "ExpertParallel(" in message and "'w1'" in message and "Replicate" in message, message
