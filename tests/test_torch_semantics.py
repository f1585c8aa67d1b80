"""torch's finer TP semantics, each checked against torch.distributed.tensor.parallel on the same module and input:
layouts mean what they mean on the actual tensor, inputs in any layout are redistributed, SequenceParallel leaves
parameter gradients Partial, PrepareModuleInputOutput exists."""

import copy

import pytest
import torch
import torch.distributed.tensor.parallel as torch_tp
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import dtp

from .reference import TORCH_VERSION, assert_close


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _both(module, plan_of, x, grad_of=lambda y: y.sum()):
    """(dtp's output, torch's output, dtp model, torch model) for the same module, plan and input."""
    mesh = dtp.default_mesh()
    ours = dtp.parallelize_module(copy.deepcopy(module), mesh, plan_of(dtp))
    theirs = torch_tp.parallelize_module(copy.deepcopy(module), mesh, plan_of(torch_tp))
    outs = []
    for model in (ours, theirs):
        xi = x.detach().clone().requires_grad_(x.is_floating_point()) if not isinstance(x, DTensor) else x
        y = model(xi)
        grad_of(full(y) if isinstance(y, DTensor) else y).backward()
        outs.append(y)
    return outs[0], outs[1], ours, theirs


def _same(ours, theirs, a, b, what):
    assert isinstance(a, DTensor) == isinstance(b, DTensor), f"{what}: {type(a).__name__} vs torch's {type(b).__name__}"
    assert isinstance(a, DTensor) or type(a) is torch.Tensor, f"{what}: dtp hands back a finished plain tensor"
    if isinstance(a, DTensor):
        assert a.placements == b.placements, f"{what}: placements {a.placements} vs torch's {b.placements}"
    assert_close(full(a).detach() if isinstance(a, DTensor) else a.detach(),
                 full(b).detach() if isinstance(b, DTensor) else b.detach(), what)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if q.grad is not None:
            assert_close(full(p.grad), full(q.grad), f"{what}: grad of {name}")


def _whole(y, placement, shape):
    """The full tensor of this rank's output y laid out as placement (a DTensor is gathered as it says)."""
    if isinstance(y, DTensor):
        return y.full_tensor()
    if isinstance(placement, Replicate):
        return y
    stride = torch.empty(shape).stride()
    return DTensor.from_local(y, dtp.default_mesh(), [placement], run_check=False, shape=shape, stride=stride).full_tensor()


def case_layouts():
    torch.manual_seed(0)
    mesh = dtp.default_mesh()
    rank, tp = mesh.get_local_rank(), mesh.size()
    linear = nn.Linear(8, 6)
    x = torch.randn(4, 8)  # the same on every rank (seeded)
    shard = x + rank  # a batch shard: different on every rank
    gathered = torch.cat([x + r for r in range(tp)])
    ids = torch.tensor([1, 4, 9, 0])
    cases = [  # what, module, plan, input, output placement, the single-process output
        ("Colwise, batch-sharded input", linear, lambda s: {"": s.ColwiseParallel(input_layouts=Shard(0))}, shard,
         Shard(-1), linear(gathered)),
        ("Colwise, output on the batch dim", linear,
         lambda s: {"": s.ColwiseParallel(output_layouts=Shard(0), use_local_output=False)}, x, None, linear(x)),
        ("Rowwise, batch-sharded output", linear,
         lambda s: {"": s.RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))}, x, Shard(0), linear(x)),
        ("Rowwise, Partial input (each rank a share)", linear,
         lambda s: {"": s.RowwiseParallel(input_layouts=Partial())}, x, Replicate(), linear(x * tp)),
        ("Rowwise embedding, 1-D ids, hidden dim sharded", nn.Embedding(10, 6),
         lambda s: {"": s.RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))}, ids, Shard(1), None),
        ("Colwise embedding, gathered", nn.Embedding(10, 6),
         lambda s: {"": s.ColwiseParallel(output_layouts=Replicate())}, ids.view(2, 2), Replicate(), None),
    ]
    for what, module, plan_of, inp, placement, expected in cases:
        expected = module(inp) if expected is None else expected
        a, b, ours, theirs = _both(module, plan_of, inp)
        assert_close(_whole(a, placement, expected.shape), expected, f"{what}: vs one process")
        if TORCH_VERSION >= (2, 8):  # torch 2.7 hands some of these back in other layouts; newer torch as dtp
            _same(ours, theirs, a, b, what)


@pytest.mark.parametrize("world", [2, 4])
def test_layouts_mean_what_they_mean_on_the_tensor(pools, world):
    pools.run(world, case_layouts)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x, y):
        return self.linear(x) + y


def case_prepare_module_input_output():
    torch.manual_seed(0)
    mesh = dtp.default_mesh()
    rank, tp = mesh.get_local_rank(), mesh.size()
    plan = lambda s: {"": s.PrepareModuleInputOutput(  # noqa: E731
        input_layouts=(Shard(0), None), desired_input_layouts=(Replicate(), None), use_local_input=True,
        output_layouts=Replicate(), desired_output_layouts=Shard(0))}
    module = TwoInputs()
    x, y = torch.ones(2, 8) * (rank + 1), torch.ones(2 * tp, 8)
    ours = dtp.parallelize_module(copy.deepcopy(module), mesh, plan(dtp))(x, y)
    whole = torch.cat([torch.ones(2, 8) * (r + 1) for r in range(tp)])  # the batch shards, gathered
    assert_close(ours, module(whole, y)[2 * rank:2 * rank + 2], "PrepareModuleInputOutput: this rank's batch rows")
    if hasattr(torch_tp, "PrepareModuleInputOutput"):  # torch >= 2.8
        theirs = torch_tp.parallelize_module(copy.deepcopy(module), mesh, plan(torch_tp))(x, y)
        assert_close(ours, theirs, "PrepareModuleInputOutput: dtp vs torch")
    with pytest.raises(AssertionError, match="input_layouts and desired_input_layouts should have same length!"):
        dtp.PrepareModuleInput(input_layouts=Shard(0), desired_input_layouts=(Replicate(), None))


def test_prepare_module_input_output(pools):
    pools.run(2, case_prepare_module_input_output)


def case_sequence_parallel_gradients(batch_sharded):
    torch.manual_seed(0)
    mesh = dtp.default_mesh()
    norm = nn.LayerNorm(12)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 6, 12)
    layout = Shard(0) if batch_sharded else Shard(1)
    results = []
    for par, style in ((dtp.parallelize_module, dtp.SequenceParallel()),
                       (torch_tp.parallelize_module, torch_tp.SequenceParallel())):
        model = par(copy.deepcopy(norm), mesh, style)
        y = model(distribute_tensor(x, mesh, [layout]))
        y.backward(torch.ones_like(y))
        assert y.placements == (Shard(1),)
        assert model.weight.grad.placements == (Partial(),), "torch's SequenceParallel leaves them Partial"
        results.append((full(y), full(model.weight.grad), full(model.bias.grad)))
    for a, b, what in zip(results[0], results[1], ("output", "weight grad", "bias grad")):
        assert_close(a, b, f"SequenceParallel {what}: dtp vs torch")
    norm(x).backward(torch.ones(4, 6, 12))
    assert_close(results[0][1], norm.weight.grad, "weight grad vs one process")


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("batch_sharded", [False, True], ids=["seq-sharded", "batch-sharded"])
def test_sequence_parallel_as_torch(pools, world, batch_sharded):
    pools.run(world, case_sequence_parallel_gradients, batch_sharded)


class HalvedOutput(torch_tp.ParallelStyle):
    """A project's own torch style (like torchtitan's NoParallel): replicated parameters, output halved by a hook."""

    def _apply(self, module, device_mesh):
        from torch.distributed.tensor import distribute_module

        return distribute_module(
            module, device_mesh,
            input_fn=lambda mod, inputs, mesh: tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                                                     for t in inputs),
            output_fn=lambda mod, out, mesh: out.to_local() * 0.5)


def case_unknown_torch_style_applied_by_torch():
    torch.manual_seed(0)
    mesh = dtp.default_mesh()
    single = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 4)
    expected = single[2](single[1](single[0](x))) * 0.5
    for order in ("together", "root-first"):
        model = copy.deepcopy(single)
        plan = {"0": torch_tp.ColwiseParallel(), "2": HalvedOutput()}
        if order == "root-first":  # dtp's first call replicates "2"'s parameters; torch's style then takes them
            dtp.parallelize_module(model, mesh, {"0": plan["0"]})
            dtp.parallelize_module(model, mesh, {"2": plan["2"]})
        else:
            dtp.parallelize_module(model, mesh, plan)
        assert type(dtp.applied_styles(model)["2"]).__name__ == "TorchStyle"
        hidden = DTensor.from_local(model[0](x), mesh, [Shard(-1)], run_check=False).full_tensor()
        assert_close(model[2](torch.relu(hidden)), expected, f"torch's own style applied by torch ({order})")


def test_unknown_torch_style_is_applied_by_torch(pools):
    pools.run(2, case_unknown_torch_style_applied_by_torch)
