"""Plans applied in several calls (torchtitan / PyTorch-example style), torch's init semantics (src_data_rank), frozen parameters."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.tensor.parallel as torch_tp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp
from examples.gpt import GPT, GPTConfig, tp_plan

from .reference import assert_close, count_collectives


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def assert_no_nesting(model):
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            assert not isinstance(p._local_tensor, DTensor), f"{name}: a DTensor inside a DTensor"


def split_plan(sp: bool):
    """tp_plan(sp) cut as torchtitan cuts it: a root plan and one plan per block (relative paths)."""
    plan = tp_plan(sp)
    root = {k: v for k, v in plan.items() if not k.startswith("layers.")}
    block = {k[len("layers.*."):]: v for k, v in plan.items() if k.startswith("layers.")}
    return root, block


def run_gpt(model, ids):
    logits = model(ids)
    loss = dtp.vocab_parallel_cross_entropy(logits, ids)
    loss.backward()
    return full(logits), loss, {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


def case_two_call_orders(sp, order):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layers=2)
    single = GPT(cfg)
    mesh = dtp.default_mesh()
    model = copy.deepcopy(single)
    root, block = split_plan(sp)
    counts = []
    if order == "root-first":
        dtp.parallelize_module(model, mesh, root)
        for layer in model.layers:  # the blocks' weights are replicated DTensors by now: sliced with no collective
            counts.append(count_collectives(lambda: dtp.parallelize_module(layer, mesh, block))[1])
    else:
        for layer in model.layers:
            dtp.parallelize_module(layer, mesh, block)
        dtp.parallelize_module(model, mesh, root)
    assert_no_nesting(model)
    once = dtp.parallelize_module(copy.deepcopy(single), mesh, tp_plan(sp))
    assert {n: type(s).__name__ for n, s in dtp.applied_styles(model).items()} == \
        {n: type(s).__name__ for n, s in dtp.applied_styles(once).items()}
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    logits, loss, grads = run_gpt(model, ids)
    ref_logits = single(ids)
    ref_loss = torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1), ids.flatten())
    ref_loss.backward()
    assert_close(logits, ref_logits, "logits")
    assert_close(loss, ref_loss, "loss")
    for name, p in single.named_parameters():
        assert_close(grads[name], p.grad, f"grad of {name}", scale=3.0)
    return [sum(c.values()) for c in counts]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("order", ["root-first", "blocks-first"])
@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_plan_in_two_calls_either_order(pools, world, order, sp):
    assert pools.run(world, case_two_call_orders, sp, order)[0] in ([], [0, 0])


def case_reapply_and_conflicts():
    mesh = dtp.default_mesh()
    model = GPT(GPTConfig())
    dtp.parallelize_module(model, mesh, tp_plan(False))
    before = {n: p for n, p in model.named_parameters()}
    dtp.parallelize_module(model, mesh, tp_plan(False))  # the identical plan again: a no-op
    assert all(p is before[n] for n, p in model.named_parameters())
    assert_no_nesting(model)
    messages = []
    with pytest.raises(ValueError) as info:
        dtp.parallelize_module(model, mesh, {"layers.0.attention.wq": dtp.RowwiseParallel()})
    assert all(s in str(info.value) for s in ("'layers.0.attention.wq'", "ColwiseParallel", "RowwiseParallel"))
    messages.append(str(info.value))
    assert all(p is before[n] for n, p in model.named_parameters()), "a refused plan changed nothing"
    other = init_device_mesh("cpu", (mesh.size(),), mesh_dim_names=("other",))
    fresh = nn.Sequential(nn.Linear(4, 8))
    fresh[0].weight = nn.Parameter(DTensor.from_local(fresh[0].weight.detach(), other, [Replicate()], run_check=False))
    with pytest.raises(ValueError) as info:
        dtp.parallelize_module(fresh, mesh, {"0": dtp.ColwiseParallel()})
    assert "'weight'" in str(info.value) and "another device mesh" in str(info.value)
    messages.append(str(info.value))
    with pytest.warns(UserWarning, match="empty"):
        assert dtp.parallelize_module(fresh, mesh, {}) is fresh
    return messages


def test_reapplying_is_a_noop_and_conflicts_are_errors(pools):
    per_rank = pools.run(2, case_reapply_and_conflicts)
    assert per_rank[0] == per_rank[1]


def case_src_data_rank(src):
    """Ranks seeded differently: torch's default leaves every rank with rank 0's values; None keeps each its own."""
    rank = dist.get_rank()
    mesh = dtp.default_mesh()
    torch.manual_seed(100 + rank)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4), nn.LayerNorm(4))
    mine = copy.deepcopy(model)
    plan = {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()}
    kwargs = {} if src == "default" else {"src_data_rank": src}
    (_, counts) = count_collectives(lambda: dtp.parallelize_module(model, mesh, plan, **kwargs))
    theirs = copy.deepcopy(mine)
    torch_tp.parallelize_module(theirs, mesh, {"0": torch_tp.ColwiseParallel(), "2": torch_tp.RowwiseParallel()},
                                **kwargs)
    rank0 = [{n: p.detach() for n, p in mine.named_parameters()}]
    dist.broadcast_object_list(rank0, src=0)
    for name, p in model.named_parameters():
        if src is None:  # each rank's own slice
            expected = dict(mine.named_parameters())[name]
            placement = p.placements[0]
            from dtp.runtime.sharding import local_slice
            assert torch.equal(p.to_local(), local_slice(expected.detach(), placement, mesh.size(), rank)), name
        else:
            assert torch.equal(full(p), rank0[0][name]), f"{name}: not rank 0's values"
        if name.startswith(("0.", "2.")):  # the modules torch splits too: the same local values as torch
            assert torch.equal(p.to_local(), dict(theirs.named_parameters())[name].to_local()), name
    layer = dtp.ColumnParallelLinear.from_linear(mine[0], mesh, **kwargs)
    expected = rank0[0]["0.weight"] if src is not None else mine[0].weight.detach()
    from dtp.runtime.sharding import local_slice
    assert torch.equal(layer.weight.to_local(), local_slice(expected, Shard(0), mesh.size(), rank))
    return dict(counts)


@pytest.mark.parametrize("src", ["default", None])
def test_src_data_rank_as_torch(pools, src):
    counts = pools.run(2, case_src_data_rank, src)[0]
    assert counts == ({"broadcast": 6} if src == "default" else {}), counts  # one per parameter, or none


def case_frozen_parameters():
    torch.manual_seed(0)
    mesh = dtp.default_mesh()
    single = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4), nn.LayerNorm(4))
    for p in (single[0].weight, single[2].bias, single[3].weight):
        p.requires_grad_(False)
    ours = dtp.parallelize_module(copy.deepcopy(single), mesh, {"0": dtp.ColwiseParallel(), "2": dtp.RowwiseParallel()})
    theirs = torch_tp.parallelize_module(copy.deepcopy(single), mesh,
                                         {"0": torch_tp.ColwiseParallel(), "2": torch_tp.RowwiseParallel()})
    frozen = {n for n, p in single.named_parameters() if not p.requires_grad}
    assert {n for n, p in ours.named_parameters() if not p.requires_grad} == frozen
    # torch 2.13 keeps them frozen too; torch 2.7's Colwise/Rowwise unfreeze the weights they split
    assert {n for n, p in theirs.named_parameters() if not p.requires_grad} <= frozen
    x = torch.randn(3, 4)
    ours(x).sum().backward()
    single(x).sum().backward()
    for name, p in ours.named_parameters():
        if name in frozen:
            assert p.grad is None, f"{name} is frozen but got a gradient"
        else:
            assert_close(full(p.grad), dict(single.named_parameters())[name].grad, f"grad of {name}")


def test_frozen_parameters_stay_frozen(pools):
    pools.run(2, case_frozen_parameters)
