"""dtp.ColumnParallelLinear / RowParallelLinear against a single-process nn.Linear doing the same math."""

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

import dtp
from dtp.runtime.sharding import local_slice

from .reference import assert_close, assert_shard_close, rank_world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _reference(in_f, out_f, bias, dtype, seed):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    if bias:
        with torch.no_grad():
            ref.bias.normal_()  # a non-zero bias, so "added exactly once" is checked
    return ref


def case_layer(kind, in_f, out_f, bias, batch, dtype_name, mode, seed=0):
    """One layer in one layout: output, weight/bias/input gradients equal nn.Linear's on every rank."""
    dtype = DTYPES[dtype_name]
    rank, world = rank_world()
    ref = _reference(in_f, out_f, bias, dtype, seed)
    x_full = torch.randn(*batch, in_f, dtype=dtype)
    g_full = torch.randn(*batch, out_f, dtype=dtype)
    x_ref = x_full.clone().requires_grad_()
    (ref(x_ref) * g_full).sum().backward()
    y_ref = ref(x_full).detach()

    if kind == "column":
        gather = mode == "gathered"
        layer = dtp.ColumnParallelLinear.from_linear(ref, gather_output=gather)
        x = x_full.clone().requires_grad_()
        y = layer(x)
        g = g_full if gather else local_slice(g_full, Shard(-1), world, rank)
        y_expected = y_ref if gather else local_slice(y_ref, Shard(-1), world, rank)
        x_grad_expected = x_ref.grad
        w_place = Shard(0)
        b_place = Shard(0)
    else:
        parallel = mode == "parallel_input"
        layer = dtp.RowParallelLinear.from_linear(ref, input_is_parallel=parallel)
        x_in = local_slice(x_full, Shard(-1), world, rank) if parallel else x_full
        x = x_in.clone().requires_grad_()
        y = layer(x)
        g, y_expected = g_full, y_ref
        x_grad_expected = local_slice(x_ref.grad, Shard(-1), world, rank) if parallel else x_ref.grad
        w_place, b_place = Shard(1), Replicate()
    assert type(y) is torch.Tensor and y.grad_fn is not None, f"output is {type(y).__name__}, grad_fn={y.grad_fn}"
    assert_close(y, y_expected, "output", dtype)
    (y * g).sum().backward()
    scale = 4.0 if dtype == torch.bfloat16 else 1.0
    assert_close(x.grad, x_grad_expected, "input grad", dtype, scale)
    assert_shard_close(layer.weight.grad, ref.weight.grad, w_place, "weight grad", dtype, scale)
    if bias:
        assert_shard_close(layer.bias.grad, ref.bias.grad, b_place, "bias grad", dtype, scale)
    else:
        assert layer.bias is None


LAYOUTS = [("column", "gathered"), ("column", "sharded"), ("row", "parallel_input"), ("row", "full_input")]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind,mode", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_matches_nn_linear(pools, world, kind, mode, bias):
    # 12 features divide 1, 2, 3 and 4; 3-D input
    pools.run(world, case_layer, kind, 12, 12, bias, (2, 3), "float32", mode)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind,mode", LAYOUTS)
def test_layer_bfloat16_and_2d_input(pools, world, kind, mode):
    pools.run(world, case_layer, kind, 16, 24, True, (5,), "bfloat16", mode)


@pytest.mark.parametrize("world", [3, 4])
@pytest.mark.parametrize("kind,mode", LAYOUTS)
def test_layer_uneven_sizes(pools, world, kind, mode):
    # 10 outputs / 7 inputs over 3 or 4 ranks: torch.chunk shards (4 ranks: 3,3,3,1 and 2,2,2,1)
    pools.run(world, case_layer, kind, 7, 10, True, (2, 3), "float32", mode)


def case_tiny_uneven_with_empty_shard():
    """5 outputs over 4 ranks: shards 2,2,1,0; the rank with nothing still takes part correctly."""
    case_layer("column", 3, 5, True, (4,), "float32", "gathered")
    case_layer("row", 5, 3, True, (4,), "float32", "full_input")


def test_layer_with_an_empty_shard(pools):
    pools.run(4, case_tiny_uneven_with_empty_shard)


def case_construction(seed):
    """Three ways to build: like nn.Linear (same draws per seed), from master_weight, from_linear."""
    rank, world = rank_world()
    torch.manual_seed(seed)
    ref = nn.Linear(10, 6)
    torch.manual_seed(seed)
    col = dtp.ColumnParallelLinear(10, 6)
    torch.manual_seed(seed)
    row = dtp.RowParallelLinear(10, 6)
    for layer, placement in ((col, Shard(0)), (row, Shard(1))):
        assert isinstance(layer.weight, nn.Parameter) and isinstance(layer.weight, DTensor)
        assert layer.weight.placements == (placement,)
        assert tuple(layer.weight.shape) == (6, 10)
        assert torch.equal(layer.weight.full_tensor(), ref.weight.detach())
        assert torch.equal(layer.bias.full_tensor(), ref.bias.detach())
    assert col.bias.placements == (Shard(0),) and row.bias.placements == (Replicate(),)
    master = torch.randn(6, 10)
    for cls, placement in ((dtp.ColumnParallelLinear, Shard(0)), (dtp.RowParallelLinear, Shard(1))):
        layer = cls(10, 6, master_weight=master)
        assert torch.equal(layer.weight.to_local(), local_slice(master, placement, world, rank))
        assert torch.equal(layer.bias.full_tensor(), torch.zeros(6))
        copy = cls.from_linear(ref)
        assert torch.equal(copy.weight.to_local(), local_slice(ref.weight.detach(), placement, world, rank))
        assert torch.equal(copy.bias.full_tensor(), ref.bias.detach())
    return True


@pytest.mark.parametrize("world", [1, 2, 4])
def test_construction_three_ways(pools, world):
    assert pools.run(world, case_construction, 7) == [True] * world


def case_meta_then_reset(seed):
    """Built on the meta device, then to_empty + reset_parameters: same values as nn.Linear's draw."""
    col = dtp.ColumnParallelLinear(8, 6, device="meta")
    assert col.weight.to_local().device.type == "meta"
    col.to_empty(device="cpu")
    torch.manual_seed(seed)
    col.reset_parameters()
    torch.manual_seed(seed)
    ref = nn.Linear(8, 6)
    assert torch.equal(col.weight.full_tensor(), ref.weight.detach())
    assert torch.equal(col.bias.full_tensor(), ref.bias.detach())


def test_meta_device_then_reset_parameters(pools):
    pools.run(2, case_meta_then_reset, 3)


def case_dtensor_in_and_out():
    """use_local_output=False returns DTensors with the right placements; DTensor inputs are taken as they are."""
    rank, world = rank_world()
    torch.manual_seed(0)
    ref1, ref2 = nn.Linear(8, 12), nn.Linear(12, 4)
    col = dtp.ColumnParallelLinear.from_linear(ref1, gather_output=False, use_local_output=False)
    row = dtp.RowParallelLinear.from_linear(ref2, input_is_parallel=True, use_local_output=False)
    x = torch.randn(3, 8)
    h = col(x)
    assert isinstance(h, DTensor) and h.placements == (Shard(1),) and tuple(h.shape) == (3, 12)
    y = row(h)
    assert isinstance(y, DTensor) and y.placements == (Replicate(),)
    assert_close(y.to_local(), ref2(ref1(x)), "DTensor path output")
    # a replicated DTensor into a Row layer is sliced locally; into a Column layer it is used as is
    xr = DTensor.from_local(x, col.device_mesh, [Replicate()])
    col_gathered = dtp.ColumnParallelLinear.from_linear(ref1)
    assert_close(col_gathered(xr), ref1(x), "column on a replicated DTensor")
    hr = DTensor.from_local(ref1(x).detach(), col.device_mesh, [Replicate()])
    assert_close(dtp.RowParallelLinear.from_linear(ref2)(hr), ref2(ref1(x)), "row on a replicated DTensor")


def test_dtensor_inputs_and_outputs(pools):
    pools.run(2, case_dtensor_in_and_out)


def case_gradients_accumulate():
    """Two backward passes add up, like any parameter's."""
    torch.manual_seed(0)
    ref = nn.Linear(6, 4)
    col = dtp.ColumnParallelLinear.from_linear(ref)
    x = torch.randn(5, 6)
    col(x).sum().backward()
    col(x).pow(2).sum().backward()
    ref(x).sum().backward()
    ref(x).pow(2).sum().backward()
    assert_shard_close(col.weight.grad, ref.weight.grad, Shard(0), "accumulated weight grad")
    assert_shard_close(col.bias.grad, ref.bias.grad, Shard(0), "accumulated bias grad")


def test_gradients_accumulate(pools):
    pools.run(2, case_gradients_accumulate)


def case_sequence_parallel_pair(seq):
    """Column with a sequence-sharded input (all-gather) → Row with a sequence-sharded output (reduce-scatter)."""
    rank, world = rank_world()
    torch.manual_seed(1)
    ref1, ref2 = nn.Linear(8, 12), nn.Linear(12, 8)
    col = dtp.ColumnParallelLinear.from_linear(ref1, gather_output=False, input_layout=Shard(1))
    row = dtp.RowParallelLinear.from_linear(ref2, input_is_parallel=True, output_layout=Shard(1),
                                            use_local_output=False)
    x_full = torch.randn(2, seq, 8)
    g_full = torch.randn(2, seq, 8)
    x_ref = x_full.clone().requires_grad_()
    (ref2(ref1(x_ref)) * g_full).sum().backward()
    x = DTensor.from_local(local_slice(x_full, Shard(1), world, rank).clone(), col.device_mesh, [Shard(1)],
                           run_check=False, shape=x_full.shape, stride=x_full.stride())
    x_local = x.to_local().detach().requires_grad_()
    x = DTensor.from_local(x_local, col.device_mesh, [Shard(1)], run_check=False, shape=x_full.shape,
                           stride=x_full.stride())
    y = row(col(x))
    assert y.placements == (Shard(1),) and tuple(y.shape) == (2, seq, 8)
    assert_close(y.to_local(), local_slice(ref2(ref1(x_full)), Shard(1), world, rank), "SP output")
    (y.to_local() * local_slice(g_full, Shard(1), world, rank)).sum().backward()
    assert_close(x_local.grad, local_slice(x_ref.grad, Shard(1), world, rank), "SP input grad")
    assert_shard_close(col.weight.grad, ref1.weight.grad, Shard(0), "SP column weight grad")
    assert_shard_close(row.weight.grad, ref2.weight.grad, Shard(1), "SP row weight grad")
    assert_shard_close(row.bias.grad, ref2.bias.grad, Replicate(), "SP row bias grad (summed over the sequence)")


@pytest.mark.parametrize("world,seq", [(2, 6), (3, 7), (4, 5)])
def test_sequence_sharded_input_and_output(pools, world, seq):
    pools.run(world, case_sequence_parallel_pair, seq)


def case_sequence_parallel_dropout():
    """SequenceParallel dropout: each rank drops on its own sequence shard, scales the rest, and the gradient follows."""
    rank, world = rank_world()
    torch.manual_seed(10 + rank)  # ranks draw their own masks
    drop = nn.Sequential(nn.Dropout(0.5))
    dtp.parallelize_module(drop, None, {"0": dtp.SequenceParallel()})
    x_full = torch.rand(2, 7, 64) + 1.0  # no zeros of its own
    local = local_slice(x_full, Shard(1), world, rank).clone().requires_grad_()
    x = DTensor.from_local(local, dtp.default_mesh(), [Shard(1)], run_check=False, shape=x_full.shape,
                           stride=x_full.stride())
    y = drop(x)
    assert isinstance(y, DTensor) and y.placements == (Shard(1),) and tuple(y.shape) == (2, 7, 64)
    out = y.to_local()
    kept = out != 0
    assert 0.3 < kept.float().mean().item() < 0.7
    assert_close(out[kept], local.detach()[kept] * 2.0, "kept values scaled by 1/(1-p)")
    out.sum().backward()
    assert_close(local.grad, kept.float() * 2.0, "gradient follows the mask")
    drop.eval()
    assert_close(drop(x).to_local(), local.detach(), "eval mode is the identity")


def test_sequence_parallel_dropout(pools):
    pools.run(2, case_sequence_parallel_dropout)
